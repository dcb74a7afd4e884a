"""Converters: round trips are bit-exact, bad sources fail by name, the command line works."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import FlavaForPreTraining

import flava_jax
from flava_jax import checkpoint, convert
from tests.processes import REPO


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bit_exact(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for key in la:
    assert la[key].dtype == lb[key].dtype and la[key].shape == lb[key].shape, key
    np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


def _tiny_model():
  config = flava_jax.FlavaConfig.from_dict({
      "image": dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, image_size=32,
                    patch_size=8, vocab_size=64),
      "text": dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=100,
                   max_position_embeddings=40),
      "multimodal": dict(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64),
      "projection_dim": 16})
  model = flava_jax.FlavaModel(config)
  params = flava_jax.init_params(model, jax.random.key(7))
  # Move every leaf off its init value (zeros/ones) so the round trip is a real test.
  rng = np.random.default_rng(8)
  return model, jax.tree_util.tree_map(
      lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)


def test_round_trip_ours_to_transformers_to_ours_is_bit_exact(tmp_path):
  model, params = _tiny_model()
  flava_jax.to_transformers(model, params, str(tmp_path))
  hf, info = FlavaForPreTraining.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert hf.image_codebook is None  # no dVAE given: init_codebook=False
  back_model, back = flava_jax.from_transformers(str(tmp_path))
  assert back_model.config == model.config
  _assert_bit_exact(params, back)

  # transformers computes the same as we do on our weights.
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 100, size=(2, 6))
  mask = np.array([[1] * 6, [1] * 3 + [0] * 3])
  ours = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    ref = hf.eval()(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                    input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    return_loss=False)
  np.testing.assert_allclose(np.asarray(ours.itm_logits), ref.itm_logits.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.mmm_text_logits), ref.mmm_text_logits.numpy(),
                             atol=1e-5)


def test_round_trip_from_transformers_weights_identical(tiny_hf_pretraining, tmp_path):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  dvae, dvae_params = flava_jax.dvae_from_transformers(tiny_hf_pretraining)
  flava_jax.to_transformers(model, params, str(tmp_path), dvae, dvae_params)
  hf = FlavaForPreTraining.from_pretrained(str(tmp_path))
  theirs = tiny_hf_pretraining.state_dict()
  for key, value in hf.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), theirs[key].numpy(), err_msg=key)
  assert set(hf.state_dict()) == set(theirs)


def _edit_weights(src_dir, dst_dir, edit):
  os.makedirs(dst_dir, exist_ok=True)
  for name in os.listdir(src_dir):
    if name != "model.safetensors":
      with open(os.path.join(src_dir, name), "rb") as f, open(os.path.join(dst_dir, name), "wb") as g:
        g.write(f.read())
  state = load_file(os.path.join(src_dir, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
  return str(dst_dir)


def test_missing_weight_is_named(tiny_hf_dir, tmp_path):
  key = "flava.text_model.encoder.layer.1.attention.attention.key.bias"
  src = _edit_weights(tiny_hf_dir, tmp_path / "m", lambda s: s.pop(key))
  with pytest.raises(flava_jax.ConversionError, match="missing.*" + key.replace(".", r"\.")):
    flava_jax.from_transformers(src)


def test_unknown_weight_is_named(tiny_hf_dir, tmp_path):
  src = _edit_weights(tiny_hf_dir, tmp_path / "u",
                      lambda s: s.update({"flava.extra_adapter.weight": np.zeros(3, np.float32)}))
  with pytest.raises(flava_jax.ConversionError, match=r"flava\.extra_adapter\.weight"):
    flava_jax.from_transformers(src)


def test_misshapen_weight_is_named(tiny_hf_dir, tmp_path):
  key = "flava.text_projection.weight"
  src = _edit_weights(tiny_hf_dir, tmp_path / "s",
                      lambda s: s.update({key: np.zeros((24, 30), np.float32)}))
  with pytest.raises(flava_jax.ConversionError, match=r"text_projection.*\(24, 30\)|shape"):
    flava_jax.from_transformers(src)


def test_legacy_tied_head_bias_is_accepted(tiny_hf_dir, tmp_path):
  """Older checkpoints store `mim_head.bias` beside `mim_head.decoder.bias`."""
  def add_alias(state):
    state["mim_head.bias"] = state["mim_head.decoder.bias"].copy()
    state["mlm_head.bias"] = state.pop("mlm_head.decoder.bias")
    state["flava.text_model.embeddings.position_ids"] = np.arange(40)[None]
  src = _edit_weights(tiny_hf_dir, tmp_path / "legacy", add_alias)
  _, params = flava_jax.from_transformers(src)
  _, reference = flava_jax.from_transformers(tiny_hf_dir)
  _assert_bit_exact(params, reference)


def test_wrong_source_kind_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    flava_jax.from_transformers(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(flava_jax.ConversionError, match="model_type"):
    flava_jax.from_transformers(str(tmp_path))


def test_command_line_both_ways(tiny_hf_pretraining, tiny_hf_dir, tmp_path):
  ckpt, back = tmp_path / "ckpt", tmp_path / "back"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "flava_jax.convert", *args], cwd=REPO, env=env,
      capture_output=True, text=True, check=True)
  out = run(f"--from_transformers={tiny_hf_dir}", f"--out={ckpt}")
  assert "pretraining heads" in out.stdout and "dVAE encoder" in out.stdout
  assert "RuntimeWarning" not in out.stderr, out.stderr  # flava_jax imports convert lazily
  loaded = checkpoint.load_model(str(ckpt))
  _, params = flava_jax.from_transformers(tiny_hf_dir)
  _assert_bit_exact(loaded.params, params)
  assert loaded.dvae is not None and not loaded.dvae.config.decoder

  run(f"--to_transformers={ckpt}", f"--out={back}")
  hf = FlavaForPreTraining.from_pretrained(str(back))
  theirs = tiny_hf_pretraining.state_dict()
  for key, value in hf.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), theirs[key].numpy(), err_msg=key)

  with pytest.raises(subprocess.CalledProcessError) as err:
    run(f"--from_transformers={tiny_hf_dir}", f"--out={ckpt}")
  assert "already holds a model" in err.value.stderr
  assert err.value.stderr.splitlines()[-1].startswith("error: ")
  assert "Traceback" not in err.value.stderr


# ---------------------------------------------------------------------------------------------
# The command line: --out is never overwritten unasked, workdirs export, errors are one line.


def _listing(path):
  return {os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(path) for n in names}


def _other_model(path):
  """A folder holding someone else's transformers model (and a tokenizer file)."""
  os.makedirs(path)
  (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  (path / "model.safetensors").write_bytes(b"not ours")
  (path / "vocab.txt").write_text("[PAD]\n")
  return _listing(path)


def _workdir(path, model, params_by_step):
  """A training workdir as the trainer writes it: run_config.json and checkpoints/STEP/state."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  os.makedirs(path)
  (path / "run_config.json").write_text(json.dumps({"model": model.config.to_dict()}))
  with ocp.CheckpointManager(str(path / "checkpoints")) as manager:
    for step, params in params_by_step.items():
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
          {"step": np.int32(step), "params": params, "opt_state": {"count": np.int32(step)}})))
    manager.wait_until_finished()
  return str(path)


def test_to_transformers_accepts_a_training_workdir(tiny_hf_dir, tmp_path):
  model, params = flava_jax.from_transformers(tiny_hf_dir)  # no init compile: fast
  older = jax.tree_util.tree_map(lambda x: x + 1, params)
  workdir = _workdir(tmp_path / "run", model, {3: older, 7: params})
  message = convert.run_command(to_hf=workdir, out=str(tmp_path / "hf"))
  assert "exported step 7" in message and "FlavaForPreTraining" in message
  back_model, back = flava_jax.from_transformers(str(tmp_path / "hf"))
  assert back_model.config == model.config
  _assert_bit_exact(params, back)
  # A newest checkpoint that cannot be read is passed over, and said so.
  os.makedirs(tmp_path / "run/checkpoints/9/state")
  message = convert.run_command(to_hf=workdir, out=str(tmp_path / "hf2"))
  assert "step 9 cannot be read" in message and "exported step 7" in message
  # A dVAE workdir and one without a finished checkpoint are clear errors.
  (tmp_path / "run/run_config.json").write_text(json.dumps({"model": {"hidden_size": 8}}))
  with pytest.raises(convert.CommandError, match="not a FLAVA training workdir"):
    convert.run_command(to_hf=workdir, out=str(tmp_path / "hf3"))
  os.makedirs(tmp_path / "fresh/checkpoints")
  with pytest.raises(convert.CommandError, match="no finished checkpoint"):
    convert.run_command(to_hf=str(tmp_path / "fresh"), out=str(tmp_path / "hf3"))
  assert not (tmp_path / "hf3").exists()


def test_out_holding_a_model_needs_overwrite_and_is_replaced_whole(tiny_hf_dir, tmp_path,
                                                                   monkeypatch):
  model, params = flava_jax.from_transformers(tiny_hf_dir)  # no init compile: fast
  params = jax.tree_util.tree_map(lambda x: x + 1, params)  # not the tiny_hf_dir weights
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_model(ckpt, model.config, params)  # without a dVAE
  out = tmp_path / "parent/out"
  before = _other_model(out)
  with pytest.raises(convert.CommandError, match=r"--out=.*out already holds a model; pass "
                     "--overwrite"):
    convert.run_command(to_hf=ckpt, out=str(out))
  assert _listing(out) == before

  # A conversion that fails while writing leaves the old folder as it was, and no temp folder.
  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(convert.transformers_io, "write_directory", disk_full)
  with pytest.raises(convert.CommandError, match="cannot write --out=.*No space left"):
    convert.run_command(to_hf=ckpt, out=str(out), overwrite=True)
  monkeypatch.undo()
  assert _listing(out) == before and os.listdir(tmp_path / "parent") == ["out"]

  convert.run_command(to_hf=ckpt, out=str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no old file left
  assert os.listdir(tmp_path / "parent") == ["out"]
  _assert_bit_exact(params, flava_jax.from_transformers(str(out))[1])

  # The other direction: a flava_jax model directory is replaced the same way.
  with pytest.raises(convert.CommandError, match="already holds a model"):
    convert.run_command(from_hf=tiny_hf_dir, out=ckpt)
  convert.run_command(from_hf=tiny_hf_dir, out=ckpt, overwrite=True)
  loaded = checkpoint.load_model(ckpt)
  _assert_bit_exact(loaded.params, flava_jax.from_transformers(tiny_hf_dir)[1])
  assert loaded.dvae is not None and sorted(os.listdir(tmp_path)) == ["ckpt", "parent"]


def test_out_that_is_not_a_model_folder_is_never_replaced(tiny_hf_dir, tmp_path):
  model, params = flava_jax.from_transformers(tiny_hf_dir)  # no init compile: fast
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(str(ckpt), model.config, params)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine/thesis.tex").write_text("years of work")
  (tmp_path / "a_file").write_text("a file")
  for out, overwrite, match in ((tmp_path / "mine", False, "already holds 1 files or folders"),
                                (tmp_path / "mine", True, "no model"),
                                (tmp_path / "a_file", True, "is a file, not a folder"),
                                (ckpt, True, "holds the source")):
    with pytest.raises(convert.CommandError, match=match):
      convert.run_command(to_hf=str(ckpt), out=str(out), overwrite=overwrite)
  assert (tmp_path / "mine/thesis.tex").read_text() == "years of work"
  assert (tmp_path / "a_file").read_text() == "a file"
  assert sorted(os.listdir(tmp_path)) == ["a_file", "ckpt", "mine"]
  # An empty --out is fine.
  (tmp_path / "empty").mkdir()
  convert.run_command(to_hf=str(ckpt), out=str(tmp_path / "empty"))
  assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]


def test_command_line_bad_sources_are_one_error_line(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, message in (
      ([f"--to_transformers={tmp_path / 'empty'}"], "is neither a training workdir"),
      ([f"--from_transformers={tmp_path / 'bert'}"], "expected model_type 'flava'")):
    run = subprocess.run([sys.executable, "-m", "flava_jax.convert", *args,
                          f"--out={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "RuntimeWarning" not in run.stderr, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(tmp_path) in errors[0], run.stderr
  assert sorted(os.listdir(tmp_path)) == ["bert", "empty"]
  with pytest.raises(convert.CommandError, match=r"empty.* has no config\.json"):
    convert.run_command(from_hf=str(tmp_path / "empty"), out=str(tmp_path / "out"))


def test_converters_are_package_attributes_imported_on_first_use():
  code = ("import sys, flava_jax; assert 'flava_jax.convert' not in sys.modules; "
          "from flava_jax import from_transformers, ConversionError; "
          "import flava_jax.convert as c; "
          "assert flava_jax.to_transformers is c.to_transformers; "
          "assert flava_jax.dvae_from_transformers is c.dvae_from_transformers; "
          "assert from_transformers is c.from_transformers and ConversionError is "
          "c.ConversionError; assert 'to_transformers' in dir(flava_jax)")
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    flava_jax.nope  # pylint: disable=pointless-statement
