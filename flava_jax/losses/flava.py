"""FLAVA's objectives combined per batch kind, with weights from the config.

    paired batch: global contrastive + MMM (image and text) + ITM
    image batch:  MIM
    text batch:   MLM

Batches are dicts of arrays with a leading batch axis (static shapes):
    paired: pixels [B,H,W,3] (normalised float; the pipeline ships uint8 and the train step
            converts it, tasks/flava.model_pixels), patch_mask [B,P] bool, input_ids, input_ids_masked, attention_mask,
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
from flava_jax.losses.masked import (label_weights, masked_prediction_loss, prediction_slots,
                                     slot_overflow, take_slots, token_cross_entropy)
from flava_jax.parse import check_choice
from flava_jax.models.heads import take_positions

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
  # Positions per row the masked-prediction heads run on (0: every position). The heads'
  # vocabulary projections then cost K instead of P or L positions per row, with the same loss
  # while every label finds a slot: image slots must cover data.mask_patches (block masks never
  # exceed it) and the data pipeline masks at most the text slot counts per row (the cap BERT's
  # max_predictions_per_seq sets). Labels beyond the slots are counted as *_overflow metrics.
  image_prediction_slots: int = 0        # MIM and MMM-image, per image
  paired_text_prediction_slots: int = 0  # MMM-text, per caption
  text_prediction_slots: int = 0         # MLM, per text row

  def __post_init__(self):
    check_choice("loss.contrastive", self.contrastive, ("global", "local"))
    if not 0 <= self.itm_negative_rate <= 1:
      raise ValueError(f"loss.itm_negative_rate={self.itm_negative_rate} is not in [0, 1]")
    for name in ("image_prediction_slots", "paired_text_prediction_slots",
                 "text_prediction_slots"):
      if getattr(self, name) < 0:
        raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0 (0: every position)")


@dataclasses.dataclass(frozen=True)
class _PairedForward:
  """One forward pass over a paired batch and the labels and weights its losses read."""

  out: Any                       # FlavaOutput
  itm_labels: Array              # [B] 1 = matched pair
  rows: Array                    # [B] weights of the rows MMM and the contrastive loss read
  image_codes: Array             # [B, K] dVAE codes at the image slots
  slot_patch_weights: Array      # [B, K]
  mlm_labels: Array              # [B, K'] at the text slots
  slot_text_weights: Array       # [B, K']
  metrics: dict


def _paired_forward(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
                    rng: Array, cfg: LossConfig, local_batch: int,
                    itm_labels: Array | None) -> _PairedForward:
  text = {k: batch[k] for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")}
  if itm_labels is None:
    if cfg.itm > 0 and cfg.itm_negative_rate > 0:
      text, itm_labels = itm.make_negatives(text, rng, cfg.itm_negative_rate,
                                            local_batch or text["input_ids"].shape[0])
    else:
      itm_labels = jnp.ones(text["input_ids"].shape[:1], jnp.int32)
  patch_weights = batch["patch_mask"].astype(jnp.float32)
  image_positions = prediction_slots(patch_weights, cfg.image_prediction_slots)
  text_weights = label_weights(text["mlm_labels"])
  text_positions = prediction_slots(text_weights, cfg.paired_text_prediction_slots)
  out = model.apply({"params": params}, batch["pixels"], text["input_ids"],
                    text["attention_mask"], bool_masked_pos=batch["patch_mask"],
                    input_ids_masked=text["input_ids_masked"], image_positions=image_positions,
                    text_positions=text_positions)
  slot_patch_weights = take_slots(patch_weights, image_positions)
  slot_text_weights = take_slots(text_weights, text_positions)
  metrics = dict(itm_accuracy=itm.itm_accuracy(out.itm_logits, itm_labels),
                 itm_negative_fraction=1.0 - jnp.mean(itm_labels.astype(jnp.float32)),
                 logit_scale=out.logit_scale)
  if image_positions is not None:
    metrics["mmm_image_overflow"] = slot_overflow(patch_weights, slot_patch_weights)
  if text_positions is not None:
    metrics["mmm_text_overflow"] = slot_overflow(text_weights, slot_text_weights)
  return _PairedForward(out=out, itm_labels=itm_labels,
                        rows=itm.positive_row_weights(itm_labels),
                        image_codes=take_slots(image_codes, image_positions),
                        slot_patch_weights=slot_patch_weights,
                        mlm_labels=take_slots(text["mlm_labels"], text_positions),
                        slot_text_weights=slot_text_weights, metrics=metrics)


def paired_loss(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
                rng: Array, cfg: LossConfig, mesh: Mesh | None = None, local_batch: int = 0,
                itm_labels: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """GC + MMM + ITM on a paired batch.

  ITM negatives are made here from `rng` (local_batch = rows per data-parallel shard) unless
  explicit `itm_labels` are given (then the captions are taken as they are).
  """
  f = _paired_forward(model, params, batch, image_codes, rng, cfg, local_batch, itm_labels)
  out, rows = f.out, f.rows
  gc_fn = (contrastive.global_contrastive_loss if cfg.contrastive == "global"
           else contrastive.local_contrastive_loss)
  losses = {
      "global_contrastive": gc_fn(out.image_embedding, out.text_embedding, out.logit_scale,
                                  rows, mesh=mesh),
      "itm": itm.itm_loss(out.itm_logits, f.itm_labels),
      "mmm_image": masked_prediction_loss(
          out.mmm_image_logits, f.image_codes, f.slot_patch_weights * rows[:, None])[0],
      "mmm_text": masked_prediction_loss(
          out.mmm_text_logits, f.mlm_labels, f.slot_text_weights * rows[:, None])[0],
  }
  total = sum(getattr(cfg, name) * value for name, value in losses.items())
  return total, dict(losses, **f.metrics)


def paired_terms(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
                 rng: Array, cfg: LossConfig, local_batch: int = 0
                 ) -> tuple[dict[str, Array], dict[str, tuple[Array, Array]], dict[str, Array]]:
  """The paired losses split for GradCache accumulation: (contrastive embeddings {image, text,
  rows}, row-decomposable terms {name: (weighted sum, weight total)}, metrics). Over several
  micro-batches, sum(numerators) / sum(denominators) is each term's whole-batch mean, and the
  global contrastive loss of the concatenated embeddings is the whole batch's."""
  f = _paired_forward(model, params, batch, image_codes, rng, cfg, local_batch, None)
  out, rows = f.out, f.rows

  def masked_sum(logits, labels, weights):
    weights = weights.astype(jnp.float32)
    return jnp.sum(token_cross_entropy(logits, labels) * weights), jnp.sum(weights)

  itm_ce = token_cross_entropy(out.itm_logits, f.itm_labels)
  terms = {
      "itm": (jnp.sum(itm_ce), jnp.asarray(itm_ce.shape[0], jnp.float32)),
      "mmm_image": masked_sum(out.mmm_image_logits, f.image_codes,
                              f.slot_patch_weights * rows[:, None]),
      "mmm_text": masked_sum(out.mmm_text_logits, f.mlm_labels,
                             f.slot_text_weights * rows[:, None]),
  }
  embeddings = {"image": out.image_embedding, "text": out.text_embedding, "rows": rows}
  return embeddings, terms, f.metrics


def image_loss(model: Any, params: Any, batch: Mapping[str, Array], image_codes: Array,
               cfg: LossConfig) -> tuple[Array, dict[str, Array]]:
  """MIM: the image encoder on [MASK]ed patches predicts their dVAE codes."""
  hidden = model.apply({"params": params}, batch["pixels"], batch["patch_mask"],
                       method="encode_image")
  mim, metrics = _head_loss(model, params, hidden[:, 1:], image_codes,
                            batch["patch_mask"].astype(jnp.float32), cfg.image_prediction_slots,
                            "mim_logits", "mim")
  return cfg.mim * mim, metrics


def text_loss(model: Any, params: Any, batch: Mapping[str, Array], cfg: LossConfig
              ) -> tuple[Array, dict[str, Array]]:
  """MLM: the text encoder on masked ids predicts the original ids."""
  hidden = model.apply({"params": params}, batch["input_ids_masked"], batch["attention_mask"],
                       method="encode_text")
  mlm, metrics = _head_loss(model, params, hidden, batch["mlm_labels"],
                            label_weights(batch["mlm_labels"]), cfg.text_prediction_slots,
                            "mlm_logits", "mlm")
  return cfg.mlm * mlm, metrics


def _head_loss(model: Any, params: Any, hidden: Array, labels: Array, weights: Array, slots: int,
               head: str, name: str) -> tuple[Array, dict[str, Array]]:
  """A masked-prediction head on hidden [B, T, D] (at its prediction slots) and its loss."""
  positions = prediction_slots(weights, slots)
  logits = model.apply({"params": params}, take_positions(hidden, positions), method=head)
  slot_weights = take_slots(weights, positions)
  loss, count = masked_prediction_loss(logits, take_slots(labels, positions), slot_weights)
  metrics = {name: loss, f"{name}_tokens": count}
  if positions is not None:
    metrics[f"{name}_overflow"] = slot_overflow(weights, slot_weights)
  return loss, metrics
