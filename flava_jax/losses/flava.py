"""FLAVA's objectives combined per batch kind, with weights from the config.

    paired batch: global contrastive + MMM (image and text) + ITM
    image batch:  MIM
    text batch:   MLM

Batches are dicts of arrays with a leading batch axis (static shapes):
    paired: pixels [B,H,W,3] (normalised float; the pipeline ships uint8 and the train step
            converts it, data/transforms.model_pixels), patch_mask [B,P] bool, input_ids, input_ids_masked, attention_mask,
            mlm_labels [B,L] (IGNORE_INDEX where no target)
    image:  pixels, patch_mask
    text:   input_ids_masked, attention_mask, mlm_labels
MIM/MMM-image targets (`image_codes` [B,P], the frozen dVAE's tokens) are computed by the train step
and passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flava_jax.losses import contrastive, itm
from flava_jax.losses.masked import label_weights, masked_prediction_loss
from flava_jax.models.config import check_choice

Array = jax.Array
# The arrays each batch kind carries (the train step adds the dVAE codes from dvae_pixels).
BATCH_KEYS = {
    "paired": ("pixels", "dvae_pixels", "patch_mask", "input_ids", "input_ids_masked",
               "attention_mask", "mlm_labels"),
    "image": ("pixels", "dvae_pixels", "patch_mask"),
    "text": ("input_ids_masked", "attention_mask", "mlm_labels"),
}
BATCH_KINDS = tuple(BATCH_KEYS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  global_contrastive: float = 1.0
  mmm_image: float = 1.0
  mmm_text: float = 1.0
  itm: float = 1.0
  mim: float = 1.0
  mlm: float = 1.0
  # Probability that a pair's caption is replaced by another row's (ITM label 0). The reference
  # training code uses 0.1; 0.5 is the ALBEF/ViLT choice.
  itm_negative_rate: float = 0.1
  contrastive: str = "global"  # "global" (all-gather over data-parallel devices) | "local"

  def __post_init__(self):
    check_choice("loss.contrastive", self.contrastive, ("global", "local"))
    if not 0 <= self.itm_negative_rate <= 1:
      raise ValueError(f"loss.itm_negative_rate={self.itm_negative_rate} is not in [0, 1]")


def paired_loss(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
                rng: Array, cfg: LossConfig, mesh: Mesh | None = None, local_batch: int = 0,
                itm_labels: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """GC + MMM + ITM on a paired batch.

  ITM negatives are made here from `rng` (local_batch = rows per data-parallel shard) unless
  explicit `itm_labels` are given (then the captions are taken as they are).
  """
  text = {k: batch[k] for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")}
  if itm_labels is None:
    if cfg.itm > 0 and cfg.itm_negative_rate > 0:
      text, itm_labels = itm.make_negatives(text, rng, cfg.itm_negative_rate,
                                            local_batch or text["input_ids"].shape[0])
    else:
      itm_labels = jnp.ones(text["input_ids"].shape[:1], jnp.int32)
  out = model.apply({"params": params}, batch["pixels"], text["input_ids"],
                    text["attention_mask"], bool_masked_pos=batch["patch_mask"],
                    input_ids_masked=text["input_ids_masked"])
  rows = itm.positive_row_weights(itm_labels)
  gc_fn = (contrastive.global_contrastive_loss if cfg.contrastive == "global"
           else contrastive.local_contrastive_loss)
  losses = {
      "global_contrastive": gc_fn(out.image_embedding, out.text_embedding, out.logit_scale,
                                  rows, mesh=mesh),
      "itm": itm.itm_loss(out.itm_logits, itm_labels),
      "mmm_image": masked_prediction_loss(
          out.mmm_image_logits, image_codes,
          batch["patch_mask"].astype(jnp.float32) * rows[:, None])[0],
      "mmm_text": masked_prediction_loss(
          out.mmm_text_logits, text["mlm_labels"], label_weights(text["mlm_labels"], rows))[0],
  }
  total = sum(getattr(cfg, name) * value for name, value in losses.items())
  metrics = dict(losses, itm_accuracy=itm.itm_accuracy(out.itm_logits, itm_labels),
                 itm_negative_fraction=1.0 - jnp.mean(itm_labels.astype(jnp.float32)),
                 logit_scale=out.logit_scale)
  return total, metrics


def image_loss(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
               cfg: LossConfig) -> tuple[Array, dict[str, Array]]:
  """MIM: the image encoder on [MASK]ed patches predicts their dVAE codes."""
  hidden = model.apply({"params": params}, batch["pixels"], batch["patch_mask"],
                       method="encode_image")
  logits = model.apply({"params": params}, hidden[:, 1:], method="mim_logits")
  mim, count = masked_prediction_loss(logits, image_codes, batch["patch_mask"])
  return cfg.mim * mim, {"mim": mim, "mim_tokens": count}


def text_loss(model: Any, params: Any, batch: Mapping[str, Array], cfg: LossConfig
              ) -> tuple[Array, dict[str, Array]]:
  """MLM: the text encoder on masked ids predicts the original ids."""
  hidden = model.apply({"params": params}, batch["input_ids_masked"], batch["attention_mask"],
                       method="encode_text")
  logits = model.apply({"params": params}, hidden, method="mlm_logits")
  mlm, count = masked_prediction_loss(logits, batch["mlm_labels"],
                                      label_weights(batch["mlm_labels"]))
  return cfg.mlm * mlm, {"mlm": mlm, "mlm_tokens": count}
