"""Our FLAVA computes what transformers' FLAVA computes, on converted weights (float32)."""

import jax
import numpy as np
import pytest
import torch
import jax.numpy as jnp

import flava_jax
from flava_jax.tools import parity
from transformers import FlavaConfig, FlavaForPreTraining, FlavaModel


def _inputs(hf_config, batch=3, length=9, seed=0, image_size=None):
  return parity.random_inputs(hf_config, batch, length, seed, image_size)


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def _assert_close(ours, theirs, tol, what):
  err = parity.max_abs_error(ours, theirs)  # raises on a shape mismatch
  assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def _check_against_reference(hf_model, model, params, inputs, tol):
  """Every encoder state, pooled output, embedding and head logit, paired and unimodal; then the
  notebook-facing methods."""
  reference = parity.reference_outputs(hf_model, inputs)
  errors = parity.compare(hf_model, model, params, inputs, reference)
  assert {"image.pre_norm_hidden", "text_masked.pre_norm_hidden", "mim_logits", "mlm_logits",
          "itm_logits", "mmm_image_logits", "mmm_text_logits"} <= set(errors)
  worst = {name: err for name, err in errors.items() if err > tol}
  assert not worst, f"above {tol}: {worst}"
  assert errors["logit_scale"] == 0.0

  x = inputs
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
  paired = reference["paired"]
  image_embedding, text_embedding = reference["image_embedding"], reference["text_embedding"]

  # The notebook-facing methods agree with the forward.
  _assert_close(apply(_nhwc(x["pixels"]), method="image_embedding"), image_embedding, tol,
                "method image_embedding")
  _assert_close(apply(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), method="text_embedding"),
                text_embedding, tol, "method text_embedding")
  _assert_close(apply(_nhwc(x["pixels"]), method="encode_image"),
                paired.image_embeddings, tol, "method encode_image")
  _assert_close(apply(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), method="encode_text"),
                paired.text_embeddings, tol, "method encode_text")
  image_hidden = apply(_nhwc(x["pixels"]), jnp.asarray(x["masked_pos"]),
                       method="image_outputs").hidden_state
  text_hidden = apply(jnp.asarray(x["ids_masked"]), jnp.asarray(x["mask"]),
                      method="text_outputs").hidden_state
  mm = apply(image_hidden, text_hidden, jnp.asarray(x["mask"]), method="encode_multimodal")
  _assert_close(mm, paired.multimodal_masked_embeddings, tol, "method encode_multimodal")
  _assert_close(apply(mm, method="itm_logits"), paired.itm_logits, tol, "method itm_logits")


def test_tiny_parity_from_directory(tiny_hf_pretraining, tiny_hf_dir):
  model, params = flava_jax.from_transformers(tiny_hf_dir)
  assert model.config.pretraining_heads
  inputs = _inputs(tiny_hf_pretraining.config)
  _check_against_reference(tiny_hf_pretraining, model, params, inputs, tol=1e-5)


def test_tiny_parity_from_model_object(tiny_hf_pretraining):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  inputs = _inputs(tiny_hf_pretraining.config, batch=2, length=5, seed=1)
  _check_against_reference(tiny_hf_pretraining, model, params, inputs, tol=1e-5)


def test_tiny_flava_model_source_has_no_heads(tiny_hf_pretraining, tmp_path):
  backbone = FlavaModel(tiny_hf_pretraining.config).eval()
  backbone.load_state_dict(tiny_hf_pretraining.flava.state_dict())
  backbone.save_pretrained(tmp_path)
  model, params = flava_jax.from_transformers(str(tmp_path))
  assert not model.config.pretraining_heads
  assert "mim_head" not in params and "itm_head" not in params
  x = _inputs(tiny_hf_pretraining.config, batch=2)
  with torch.no_grad():
    ref = backbone(input_ids=torch.tensor(x["ids"]), pixel_values=torch.tensor(x["pixels"]),
                   attention_mask=torch.tensor(x["mask"]))
  out = model.apply({"params": params}, _nhwc(x["pixels"]), jnp.asarray(x["ids"]),
                    jnp.asarray(x["mask"]))
  _assert_close(out.image.last_hidden_state, ref.image_embeddings, 1e-5, "image")
  _assert_close(out.text.last_hidden_state, ref.text_embeddings, 1e-5, "text")
  _assert_close(out.multimodal_masked.last_hidden_state, ref.multimodal_embeddings, 1e-5, "mm")
  assert out.itm_logits is None
  with pytest.raises(ValueError, match="pretraining_heads=False"):
    model.apply({"params": params}, out.multimodal_masked.last_hidden_state, method="itm_logits")


def test_position_embeddings_interpolate_like_reference(tiny_hf_pretraining):
  """Images larger than the configured size: bicubic interpolation as transformers does it."""
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  for size in (48, 24):
    x = _inputs(tiny_hf_pretraining.config, batch=2, image_size=size)
    with torch.no_grad():
      ref = tiny_hf_pretraining.flava.image_model(torch.tensor(x["pixels"]),
                                                  interpolate_pos_encoding=True)
    ours = model.apply({"params": params}, _nhwc(x["pixels"]), method="encode_image")
    _assert_close(ours, ref.last_hidden_state, 1e-5, f"image at {size}px")


@pytest.fixture(scope="module")
def full_hf_pretraining():
  """FLAVA-full sizes (transformers' default FlavaConfig), random weights, no codebook."""
  torch.manual_seed(0)
  from conftest import randomize_  # pylint: disable=import-outside-toplevel
  model = FlavaForPreTraining(FlavaConfig(init_codebook=False)).eval()
  return randomize_(model, seed=1)


def test_full_parity(full_hf_pretraining):
  model, params = flava_jax.from_transformers(full_hf_pretraining)
  cfg = model.config
  assert (cfg.image.hidden_size, cfg.image.num_layers, cfg.text.num_layers,
          cfg.multimodal.num_layers, cfg.image.num_patches) == (768, 12, 12, 6, 196)
  inputs = _inputs(full_hf_pretraining.config, batch=2, length=12)
  _check_against_reference(full_hf_pretraining, model, params, inputs, tol=1e-4)


def _relative_error(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_bfloat16_compute_agrees_with_float32(which, tiny_hf_pretraining, request):
  hf = tiny_hf_pretraining if which == "tiny" else request.getfixturevalue("full_hf_pretraining")
  model32, params = flava_jax.from_transformers(hf)
  model16 = flava_jax.FlavaModel(model32.config.replace(dtype="bfloat16"))
  x = _inputs(hf.config, batch=2, length=8)
  args = (_nhwc(x["pixels"]), jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
  out32 = model32.apply({"params": params}, *args)
  out16 = model16.apply({"params": params}, *args)
  assert out16.image.last_hidden_state.dtype == jnp.bfloat16
  assert out16.image_embedding.dtype == jnp.float32  # normalised in float32
  for name in ("image_embedding", "text_embedding"):
    err = _relative_error(getattr(out16, name), getattr(out32, name))
    assert err <= 2e-2, f"{which} {name}: bf16 relative error {err:.3g}"
  err = _relative_error(out16.multimodal_masked.last_hidden_state,
                        out32.multimodal_masked.last_hidden_state)
  assert err <= 2e-2, f"{which} multimodal states: bf16 relative error {err:.3g}"


def test_tiny_parity_without_qkv_bias():
  from conftest import TINY_HF, randomize_  # pylint: disable=import-outside-toplevel
  config = {k: (dict(v, qkv_bias=False) if k != "image_codebook_config" and isinstance(v, dict)
                else v) for k, v in TINY_HF.items()}
  torch.manual_seed(0)
  hf = randomize_(FlavaForPreTraining(FlavaConfig(**config, init_codebook=False)).eval(), seed=5)
  model, params = flava_jax.from_transformers(hf)
  assert not model.config.text.qkv_bias
  assert "qkv_bias" not in params["text_encoder"]["encoder"]["layers"]["attention"]
  _check_against_reference(hf, model, params, _inputs(hf.config, batch=2), tol=1e-5)


def _sentence_pair_types(mask):
  """BERT's sentence-pair token types on each row's real tokens: 0 over the first half (the first
  text up to its [SEP]), 1 over the rest (the second text), 0 on padding."""
  types = np.zeros_like(mask)
  for row, length in enumerate(mask.sum(1)):
    types[row, length // 2:length] = 1
  return types


def test_token_type_ids_of_sentence_pairs_match_reference(tiny_hf_pretraining):
  """Token types 1 (a pair's second text, as sentence-pair fine-tuning feeds them) give what
  transformers gives: text states and pooled output, the contrastive text embedding, the fusion
  and its heads, MLM logits, and the [CLS_T] the text classifier reads."""
  from flava_jax.models.classifier import FlavaClassifier  # pylint: disable=import-outside-toplevel
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  assert model.config.text.type_vocab_size == 2
  x = _inputs(tiny_hf_pretraining.config, batch=3, length=9, seed=2)
  types = _sentence_pair_types(x["mask"])
  assert types.sum() == 5 + 2 + 1 and not types[:, 0].any()  # rows of 9, 4 and 2 real tokens
  t = {k: torch.tensor(v) for k, v in dict(x, types=types).items()}
  with torch.no_grad():
    paired = tiny_hf_pretraining(
        input_ids=t["ids"], input_ids_masked=t["ids_masked"], pixel_values=t["pixels"],
        attention_mask=t["mask"], token_type_ids=t["types"], bool_masked_pos=t["masked_pos"],
        return_loss=False, skip_unmasked_multimodal_encoder=True)
    text_only = tiny_hf_pretraining(input_ids=t["ids"], input_ids_masked=t["ids_masked"],
                                    attention_mask=t["mask"], token_type_ids=t["types"],
                                    return_loss=False)
    flava = tiny_hf_pretraining.flava
    text_embedding = torch.nn.functional.normalize(
        flava.text_projection(paired.text_embeddings[:, 0]), dim=-1)

  ids, mask, ids_masked = (jnp.asarray(x[k]) for k in ("ids", "mask", "ids_masked"))
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
  ours = apply(_nhwc(x["pixels"]), ids, mask, bool_masked_pos=jnp.asarray(x["masked_pos"]),
               input_ids_masked=ids_masked, token_type_ids=jnp.asarray(types))
  ours_text = apply(input_ids=ids, attention_mask=mask, input_ids_masked=ids_masked,
                    token_type_ids=jnp.asarray(types))
  tol = 1e-5
  for what, mine, theirs in [
      ("text states", ours.text.last_hidden_state, paired.text_output.last_hidden_state),
      ("text pooled", ours.text.pooled, paired.text_output.pooler_output),
      ("masked text pre-LN states", ours.text_masked.hidden_state,
       paired.text_masked_output.hidden_states[-1]),
      ("text embedding", ours.text_embedding, text_embedding),
      ("multimodal states", ours.multimodal_masked.last_hidden_state,
       paired.multimodal_masked_output.last_hidden_state),
      ("itm logits", ours.itm_logits, paired.itm_logits),
      ("mmm text logits", ours.mmm_text_logits, paired.mmm_text_logits),
      ("mlm logits", ours_text.mlm_logits, text_only.mlm_logits),
      ("method encode_text", apply(ids, mask, jnp.asarray(types), method="encode_text"),
       paired.text_output.last_hidden_state)]:
    _assert_close(mine, theirs, tol, what)

  # The fine-tuning classifier's text input ([CLS_T] of the pair) passes the types on.
  classifier = FlavaClassifier(model.config, "text", num_classes=2, hidden_size=8)
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": jnp.asarray(types)}
  fresh = classifier.init(jax.random.key(0), batch, method="pooled")["params"]
  (backbone,) = [name for name, group in fresh.items() if "text_encoder" in group]
  cls = classifier.apply({"params": dict(fresh, **{backbone: params})}, batch, method="pooled")
  _assert_close(cls, paired.text_output.last_hidden_state[:, 0], tol, "classifier [CLS_T]")

  # The types matter: all-zero types move the text states far beyond the tolerance.
  zeros = apply(ids, mask, jnp.zeros_like(ids), method="encode_text")
  assert parity.max_abs_error(zeros, paired.text_output.last_hidden_state) > 1000 * tol
