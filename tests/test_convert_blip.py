"""BLIP converters: bit-exact round trips both ways, bad sources fail naming the weight, and the
command line converts both ways (flava_jax.convert_blip through flava_jax.convert)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from flava_jax import checkpoint, convert, convert_blip
from flava_jax.convert import ConversionError
from flava_jax.models.blip import Blip, BlipConfig, BlipTextConfig
from flava_jax.models.config import ImageConfig
from tests.models import blip_reference
from tests.processes import REPO

RETRIEVAL, CAPTIONING = "retrieval", "captioning"


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bit_exact(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys(), set(la) ^ set(lb)
  for key in la:
    assert la[key].dtype == lb[key].dtype and la[key].shape == lb[key].shape, key
    np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


def _assert_same_state(hf_model, reference):
  ours, theirs = hf_model.state_dict(), reference.state_dict()
  assert set(ours) == set(theirs), set(ours) ^ set(theirs)
  for key, value in ours.items():
    assert torch.equal(value, theirs[key]), key


def _our_model(enc_token_id=61, **changes):
  """A tiny flava_jax BLIP with random values in every leaf (drawn in numpy on the shapes
  init_params gives: no init compile)."""
  config = BlipConfig(
      image=ImageConfig(hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96, image_size=32,
                        patch_size=8, layer_norm_eps=1e-6),
      text=BlipTextConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=64,
                          max_position_embeddings=40, bos_token_id=60,
                          enc_token_id=enc_token_id,
                          sep_token_id=3),
      embed_dim=16)
  config = dataclasses.replace(config, **changes).validate()
  shapes = jax.eval_shape(Blip(config).init_params, jax.random.key(0))
  rng = np.random.default_rng(1)
  return Blip(config), jax.tree_util.tree_map(
      lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def hf_models():
  return blip_reference.models()


@pytest.fixture(scope="module")
def hf_dirs(hf_models, tmp_path_factory):
  root = tmp_path_factory.mktemp("blip_hf")
  for kind, model in zip((RETRIEVAL, CAPTIONING), hf_models):
    model.save_pretrained(root / kind)
  return {kind: str(root / kind) for kind in (RETRIEVAL, CAPTIONING)}


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {},  # the pretraining layout: shared decoder
    dict(share_decoder=False, tie_word_embeddings=False, enc_token_id=5),
    dict(with_decoder=False, share_decoder=False),
    dict(with_encoder=False, share_decoder=False),
], ids=["shared", "separate-untied-enc5", "retrieval-only", "captioning-only"])
def test_ours_to_transformers_to_ours_is_bit_exact(tmp_path, changes):
  model, params = _our_model(**changes)
  written = convert_blip.to_transformers(model, params, str(tmp_path))
  sources = {}
  for kind, cls in ((RETRIEVAL, BlipForImageTextRetrieval),
                    (CAPTIONING, BlipForConditionalGeneration)):
    path = tmp_path / kind
    assert path.exists() == (str(path) in written)
    if path.exists():
      _, info = cls.from_pretrained(str(path), output_loading_info=True)
      assert not any(info.values()), info  # no missing, unexpected or mismatched weight
      sources[kind] = str(path)
  back_model, back = convert_blip.from_transformers(**sources)
  assert back_model.config == model.config
  _assert_bit_exact(params, back)


def test_transformers_to_ours_to_transformers_is_identical(hf_models, hf_dirs, tmp_path):
  retrieval, captioning = hf_models
  model, params = convert_blip.from_transformers(hf_dirs[RETRIEVAL], hf_dirs[CAPTIONING])
  assert not model.config.share_decoder and model.config.with_encoder
  convert_blip.to_transformers(model, params, str(tmp_path))
  _assert_same_state(BlipForImageTextRetrieval.from_pretrained(str(tmp_path / RETRIEVAL)),
                     retrieval)
  _assert_same_state(BlipForConditionalGeneration.from_pretrained(str(tmp_path / CAPTIONING)),
                     captioning)
  # One source at a time gives that model's parts only, and writes it back the same.
  for kind, reference in zip((RETRIEVAL, CAPTIONING), hf_models):
    single, single_params = convert_blip.from_transformers(**{kind: reference})
    assert (single.config.with_encoder, single.config.with_decoder) == (
        kind == RETRIEVAL, kind == CAPTIONING)
    assert ("text_decoder" in single_params) == (kind == CAPTIONING)
    with pytest.raises(ValueError, match="needs the part this model lacks"):
      if kind == RETRIEVAL:
        single.decoder_logits(single_params, None, None, None)
      else:
        single.itm_logits(single_params, None)
    out = tmp_path / f"only_{kind}"
    convert_blip.to_transformers(single, single_params, str(out))
    assert os.listdir(out) == [kind]
    cls = type(reference)
    _assert_same_state(cls.from_pretrained(str(out / kind)), reference)


def test_shared_decoder_is_detected_and_written_whole(tmp_path):
  retrieval, captioning = blip_reference.models(seed=4, share_decoder=True)
  model, params = convert_blip.from_transformers(retrieval, captioning)
  assert model.config.share_decoder
  convert_blip.to_transformers(model, params, str(tmp_path))
  _assert_same_state(BlipForConditionalGeneration.from_pretrained(str(tmp_path / CAPTIONING)),
                     captioning)
  separate, _ = convert_blip.from_transformers(retrieval, captioning, share_decoder=False)
  assert not separate.config.share_decoder


# --- bad sources ----------------------------------------------------------------------------


def _edit_weights(src_dir, dst_dir, edit):
  os.makedirs(dst_dir, exist_ok=True)
  for name in os.listdir(src_dir):
    if name != "model.safetensors":
      with open(os.path.join(src_dir, name), "rb") as f, open(os.path.join(dst_dir, name),
                                                              "wb") as g:
        g.write(f.read())
  state = load_file(os.path.join(src_dir, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
  return str(dst_dir)


def _pattern(key):
  return key.replace(".", r"\.")


def test_missing_unknown_and_misshapen_weights_are_named(hf_dirs, tmp_path):
  key = "text_encoder.encoder.layer.1.crossattention.self.value.bias"
  src = _edit_weights(hf_dirs[RETRIEVAL], tmp_path / "m", lambda s: s.pop(key))
  with pytest.raises(ConversionError, match="missing.*" + _pattern(key)):
    convert_blip.from_transformers(retrieval=src)

  key = "text_decoder.cls.predictions.transform.dense.weight"
  src = _edit_weights(hf_dirs[CAPTIONING], tmp_path / "m2", lambda s: s.pop(key))
  with pytest.raises(ConversionError, match="missing.*" + _pattern(key)):
    convert_blip.from_transformers(hf_dirs[RETRIEVAL], src)

  src = _edit_weights(hf_dirs[CAPTIONING], tmp_path / "u", lambda s: s.update(
      {"text_decoder.adapter.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ConversionError, match=r"captioning=.*no place.*text_decoder\.adapter"):
    convert_blip.from_transformers(captioning=src)

  key = "itm_head.weight"
  src = _edit_weights(hf_dirs[RETRIEVAL], tmp_path / "s",
                      lambda s: s.update({key: np.zeros((3, 32), np.float32)}))
  with pytest.raises(ConversionError, match=r"itm_head/kernel from itm_head\.weight has shape"):
    convert_blip.from_transformers(retrieval=src)


def test_differing_vision_weights_are_refused(hf_dirs, tmp_path):
  key = "vision_model.encoder.layers.1.mlp.fc2.bias"

  def nudge(state):
    state[key] = state[key] + 1e-6
  src = _edit_weights(hf_dirs[CAPTIONING], tmp_path / "v", nudge)
  with pytest.raises(ConversionError, match=f"vision_model weights differ.*{_pattern(key)}.*"
                     "one at a time"):
    convert_blip.from_transformers(hf_dirs[RETRIEVAL], src)
  # Each alone converts.
  convert_blip.from_transformers(captioning=src)


def test_share_decoder_true_names_the_differing_weight(hf_models):
  retrieval, captioning = hf_models  # independently drawn: the embeddings differ first
  with pytest.raises(ConversionError, match=r"share_decoder=True .* text_decoder\.bert\."
                     r"embeddings\.word_embeddings\.weight \(vs text_encoder\.embeddings"):
    convert_blip.from_transformers(retrieval, captioning, share_decoder=True)
  with pytest.raises(ConversionError, match="needs both"):
    convert_blip.from_transformers(captioning=captioning, share_decoder=True)


def test_tied_lm_head_copies_are_checked(hf_dirs, tmp_path):
  """Older captioning files store the tied copies (decoder.weight, decoder.bias)."""
  lm = "text_decoder.cls.predictions."
  words = "text_decoder.bert.embeddings.word_embeddings.weight"

  def add_copies(state):
    state[lm + "decoder.weight"] = state[words].copy()
    state[lm + "decoder.bias"] = state.pop(lm + "bias")
    state["text_decoder.bert.embeddings.position_ids"] = np.arange(40)[None].astype(np.float32)
  _, params = convert_blip.from_transformers(
      captioning=_edit_weights(hf_dirs[CAPTIONING], tmp_path / "legacy", add_copies))
  _, reference = convert_blip.from_transformers(captioning=hf_dirs[CAPTIONING])
  _assert_bit_exact(params, reference)

  def bad_copy(state):
    state[lm + "decoder.weight"] = state[words] * 2
  with pytest.raises(ConversionError, match=_pattern(lm + "decoder.weight") + " differs"):
    convert_blip.from_transformers(
        captioning=_edit_weights(hf_dirs[CAPTIONING], tmp_path / "bad", bad_copy))


def test_wrong_kind_of_source_is_clear(hf_dirs, tmp_path):
  with pytest.raises(ConversionError, match="holds a BlipForConditionalGeneration.*captioning="):
    convert_blip.from_transformers(retrieval=hf_dirs[CAPTIONING])
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "flava"}))
  with pytest.raises(ConversionError, match="expected model_type 'blip'"):
    convert_blip.from_transformers(captioning=str(tmp_path))
  with pytest.raises(ValueError, match="retrieval=, captioning= or both"):
    convert_blip.from_transformers()


# --- model directories and the command line -------------------------------------------------


def _workdir(path, model, params):
  """A BLIP training workdir as the trainer writes it: run_config.json, checkpoints/STEP/state."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  os.makedirs(path)
  (path / "run_config.json").write_text(json.dumps({"task": "blip",
                                                    "model": model.config.to_dict()}))
  with ocp.CheckpointManager(str(path / "checkpoints")) as manager:
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": np.int32(4), "params": params, "opt_state": {"count": np.int32(4)}})))
    manager.wait_until_finished()
  return str(path)


def test_command_line_both_ways(hf_models, hf_dirs, tmp_path):
  ckpt, back = tmp_path / "ckpt", tmp_path / "back"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "flava_jax.convert", *args], cwd=REPO, env=env,
      capture_output=True, text=True, check=True, timeout=300)
  done = run(f"--from_transformers={hf_dirs[RETRIEVAL]},{hf_dirs[CAPTIONING]}", f"--out={ckpt}")
  assert "BLIP with" in done.stdout and "RuntimeWarning" not in done.stderr, done
  loaded = checkpoint.load_model(str(ckpt))
  assert loaded.task == "blip" and isinstance(loaded.model, Blip)
  assert json.loads((ckpt / checkpoint.MODEL_JSON).read_text())["task"] == "blip"
  model, params = convert_blip.from_transformers(hf_dirs[RETRIEVAL], hf_dirs[CAPTIONING])
  assert loaded.model.config == model.config
  _assert_bit_exact(loaded.params, params)

  done = run(f"--to_transformers={ckpt}", f"--out={back}")
  assert "BlipForImageTextRetrieval" in done.stdout, done
  for kind, reference in zip((RETRIEVAL, CAPTIONING), hf_models):
    _assert_same_state(type(reference).from_pretrained(str(back / kind)), reference)

  # In-process: the exported folder converts back as one argument; --overwrite replaces a BLIP
  # export; a training workdir exports; a lone captioning directory is recognised.
  again = tmp_path / "again"
  convert.run_command(from_hf=str(back), out=str(again))
  _assert_bit_exact(checkpoint.load_model(str(again)).params, params)
  with pytest.raises(convert.CommandError, match="already holds a model"):
    convert.run_command(to_hf=str(ckpt), out=str(back))
  convert.run_command(to_hf=str(ckpt), out=str(back), overwrite=True)
  assert sorted(os.listdir(back)) == [CAPTIONING, RETRIEVAL]
  message = convert.run_command(to_hf=_workdir(tmp_path / "run", model, params),
                                out=str(tmp_path / "from_run"))
  assert "exported step 4" in message and "codebook" not in message
  _assert_same_state(BlipForImageTextRetrieval.from_pretrained(
      str(tmp_path / "from_run" / RETRIEVAL)), hf_models[0])
  message = convert.run_command(from_hf=hf_dirs[CAPTIONING], out=str(tmp_path / "cap"))
  assert "(decoder) from captioning" in message
  assert not checkpoint.load_model(str(tmp_path / "cap")).model.config.with_encoder
  with pytest.raises(convert.CommandError, match="RETRIEVAL_DIR,CAPTIONING_DIR"):
    convert.run_command(from_hf="a,b,c", out=str(tmp_path / "x"))


def test_flava_model_directories_still_load(tiny_hf_dir, tmp_path):
  """A FLAVA directory written before the "task" field (no task: FLAVA) and one written now."""
  model, params = convert.from_transformers(tiny_hf_dir)
  checkpoint.save_model(str(tmp_path / "new"), model.config, params)
  assert json.loads((tmp_path / "new" / checkpoint.MODEL_JSON).read_text())["task"] == "flava"
  meta = tmp_path / "new" / checkpoint.MODEL_JSON
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != "task"}))
  loaded = checkpoint.load_model(str(tmp_path / "new"))
  assert loaded.task == "flava" and loaded.model.config == model.config
