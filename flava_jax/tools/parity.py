"""Measures how closely flava_jax reproduces transformers' FLAVA on the same weights and inputs.

    python -m flava_jax.tools.parity --from_transformers=/path/to/flava-full
    python -m flava_jax.tools.parity --variant=full      # random FLAVA-full reference weights

Prints the max abs error of every encoder state, embedding and head logit (float32 on both sides,
random images and padded random text) and exits non-zero when one exceeds --tolerance. Needs
torch (CPU is enough).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax.convert import from_transformers


def random_inputs(hf_config: Any, batch: int = 2, length: int = 16, seed: int = 0,
                  image_size: int | None = None) -> dict[str, np.ndarray]:
  """Random NCHW pixels, ids with right padding on some rows, masked ids and patch masks."""
  rng = np.random.default_rng(seed)
  img = hf_config.image_config
  size = image_size or img.image_size
  pixels = rng.normal(size=(batch, img.num_channels, size, size)).astype(np.float32)
  ids = rng.integers(1, hf_config.text_config.vocab_size, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  if batch > 1:
    mask[1, length // 2:] = 0
  mask[-1, 2:] = 0
  ids = ids * mask  # pad id 0
  ids_masked = ids.copy()
  ids_masked[:, 1] = min(3, hf_config.text_config.vocab_size - 1)
  num_patches = (size // img.patch_size) ** 2
  masked_pos = rng.random((batch, num_patches)) < 0.4
  return dict(pixels=pixels, ids=ids, mask=mask, ids_masked=ids_masked, masked_pos=masked_pos)


def max_abs_error(ours: Any, theirs: Any) -> float:
  """max |ours - theirs| of a jax/numpy array and a torch tensor (or array) of the same shape."""
  ours = np.asarray(ours)
  theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
  if ours.shape != theirs.shape:
    raise ValueError(f"shape mismatch: ours {ours.shape}, reference {theirs.shape}")
  return float(np.max(np.abs(ours - theirs))) if ours.size else 0.0


def reference_outputs(hf_model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The transformers forward passes `compare` checks against: paired, image-only, text-only, and
  the L2-normalised contrastive embeddings."""
  import torch  # pylint: disable=import-outside-toplevel

  t = {k: torch.tensor(v) for k, v in inputs.items()}
  with torch.no_grad():
    paired = hf_model(input_ids=t["ids"], input_ids_masked=t["ids_masked"],
                      pixel_values=t["pixels"], attention_mask=t["mask"],
                      bool_masked_pos=t["masked_pos"], return_loss=False,
                      skip_unmasked_multimodal_encoder=True)
    image_only = hf_model(pixel_values=t["pixels"], bool_masked_pos=t["masked_pos"],
                          return_loss=False)
    text_only = hf_model(input_ids=t["ids"], input_ids_masked=t["ids_masked"],
                         attention_mask=t["mask"], return_loss=False)
    flava = hf_model.flava
    normalize = torch.nn.functional.normalize
    image_embedding = normalize(flava.image_projection(paired.image_embeddings[:, 0]), dim=-1)
    text_embedding = normalize(flava.text_projection(paired.text_embeddings[:, 0]), dim=-1)
  return dict(paired=paired, image_only=image_only, text_only=text_only,
              image_embedding=image_embedding, text_embedding=text_embedding,
              logit_scale=flava.logit_scale)


def compare(hf_model: Any, model: Any, params: Mapping, inputs: Mapping[str, np.ndarray],
            reference: Mapping[str, Any] | None = None) -> dict[str, float]:
  """Max abs error per output between a transformers FlavaForPreTraining and ours.

  `reference`: the result of reference_outputs(hf_model, inputs), when the caller has it already.
  """
  ref = reference if reference is not None else reference_outputs(hf_model, inputs)
  paired, image_only, text_only = ref["paired"], ref["image_only"], ref["text_only"]

  @jax.jit
  def forward(params, pixels, ids, mask, masked_pos, ids_masked):
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
    return (apply(pixels, ids, mask, bool_masked_pos=masked_pos, input_ids_masked=ids_masked),
            apply(pixels, bool_masked_pos=masked_pos),
            apply(input_ids=ids, attention_mask=mask, input_ids_masked=ids_masked))

  ours, ours_image, ours_text = forward(
      params, jnp.asarray(inputs["pixels"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["ids"]),
      jnp.asarray(inputs["mask"]), jnp.asarray(inputs["masked_pos"]),
      jnp.asarray(inputs["ids_masked"]))

  errors = {}
  for name, mine, theirs in [("image", ours.image, paired.image_output),
                             ("text", ours.text, paired.text_output),
                             ("image_masked", ours.image_masked, paired.image_masked_output),
                             ("text_masked", ours.text_masked, paired.text_masked_output),
                             ("multimodal", ours.multimodal_masked,
                              paired.multimodal_masked_output)]:
    errors[f"{name}.last_hidden_state"] = max_abs_error(mine.last_hidden_state,
                                                        theirs.last_hidden_state)
    errors[f"{name}.pooled"] = max_abs_error(mine.pooled, theirs.pooler_output)
    if theirs.hidden_states is not None:  # the pre-final-LayerNorm states the fusion consumes
      errors[f"{name}.pre_norm_hidden"] = max_abs_error(mine.hidden_state,
                                                        theirs.hidden_states[-1])
  errors["image_embedding"] = max_abs_error(ours.image_embedding, ref["image_embedding"])
  errors["text_embedding"] = max_abs_error(ours.text_embedding, ref["text_embedding"])
  errors["logit_scale"] = max_abs_error(ours.logit_scale, ref["logit_scale"])
  errors["itm_logits"] = max_abs_error(ours.itm_logits, paired.itm_logits)
  errors["mmm_image_logits"] = max_abs_error(ours.mmm_image_logits, paired.mmm_image_logits)
  errors["mmm_text_logits"] = max_abs_error(ours.mmm_text_logits, paired.mmm_text_logits)
  # Without labels the reference applies the MIM head to [CLS_I] too; ours covers the patches.
  errors["mim_logits"] = max_abs_error(ours_image.mim_logits, image_only.mim_logits[:, 1:])
  errors["mlm_logits"] = max_abs_error(ours_text.mlm_logits, text_only.mlm_logits)
  return errors


def randomize_weights_(model: Any, seed: int = 0) -> Any:
  """Redraws every weight of a torch model in place (biases, LayerNorms, [CLS]/[MASK]/position
  tokens included), so no parameter sits at a zero/one initial value where a mapping mistake could
  hide. Matrices get unit-variance outputs; the logit scale is set to 2.3."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("logit_scale"):
        p.copy_(torch.tensor(2.3))
      elif p.ndim >= 2 and p.shape[0] > 1:  # weight matrices, embedding tables, conv kernels
        p.copy_(noise / (p.numel() / p.shape[0]) ** 0.5)
      elif "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:  # biases and [1, 1, D] tokens
        p.copy_(0.1 * noise)
  return model


def _reference(variant: str | None, source: str | None):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import FlavaConfig, FlavaForPreTraining  # pylint: disable=import-outside-toplevel
  if source:
    return FlavaForPreTraining.from_pretrained(source).eval()
  torch.manual_seed(0)
  if variant == "full":
    return randomize_weights_(FlavaForPreTraining(FlavaConfig(init_codebook=False)).eval())
  small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
  return randomize_weights_(FlavaForPreTraining(FlavaConfig(
      image_config=dict(small, image_size=64, patch_size=16, vocab_size=512),
      text_config=dict(small, vocab_size=1024, max_position_embeddings=128),
      multimodal_config=dict(small, num_hidden_layers=1), hidden_size=64, projection_dim=64,
      init_codebook=False)).eval())


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_default_matmul_precision", "highest")
  hf_model = _reference(f.variant, f.from_transformers)
  model, params = from_transformers(hf_model)
  inputs = random_inputs(hf_model.config, batch=f.batch, length=f.text_length, seed=f.seed)
  errors = compare(hf_model, model, params, inputs)
  source = f.from_transformers or f"random {f.variant} reference"
  print(f"flava_jax vs transformers FlavaForPreTraining ({source}), float32, batch {f.batch}, "
        f"text length {f.text_length} (padded rows included)")
  for name, err in errors.items():
    flag = "" if err <= f.tolerance else "   <-- above tolerance"
    print(f"  {name:<32s} max abs error {err:.2e}{flag}")
  worst = max(errors.values())
  print(f"worst: {worst:.2e} (tolerance {f.tolerance:.0e})")
  if worst > f.tolerance:
    raise SystemExit(1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("from_transformers", None, "a FlavaForPreTraining save_pretrained directory")
  flags.DEFINE_enum("variant", "tiny", ["tiny", "full"], "random reference when no directory")
  flags.DEFINE_integer("batch", 2, "batch size")
  flags.DEFINE_integer("text_length", 16, "text length")
  flags.DEFINE_integer("seed", 0, "input seed")
  flags.DEFINE_float("tolerance", 1e-4, "max abs error allowed")
  app.run(main)
