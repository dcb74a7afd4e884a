"""Random FLAVA train-step batches (the FLAVA task's random_batch), for the bench and its peer.

Pixels are uniform uint8 (as the data pipeline ships them), patch masks are BEiT block masks of
data.mask_patches, text is full-length random ids with MLM masking at data.mlm_rate (capped at the
loss's prediction slots, as the pipeline caps it). numpy only: the peer's process imports it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flava_jax.data import masking, transforms

MASK_ID = 103  # BERT's [MASK]; any id serves for timing


@dataclasses.dataclass(frozen=True)
class BatchShapes:
  image_size: int
  dvae_size: int
  grid: int
  paired_text_length: int
  text_length: int
  text_vocab_size: int
  masked_patches: int
  mask_min_block: int
  mlm_rate: float
  paired_text_slots: int
  text_slots: int
  itm_negative_rate: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def random_batch(kind: str, batch: int, shapes: BatchShapes, seed: int = 0
                 ) -> dict[str, np.ndarray]:
  """One batch of kind paired | image | text with the keys the train step takes."""
  rng = np.random.default_rng(seed)
  out = {}
  if kind != "text":
    size, dvae_size = shapes.image_size, shapes.dvae_size
    out["pixels"] = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    out["dvae_pixels"] = rng.integers(0, 256, (batch, dvae_size, dvae_size, 3), dtype=np.uint8)
    block = masking.BlockMaskConfig(grid_size=shapes.grid, num_masked=shapes.masked_patches,
                                    min_block=min(shapes.mask_min_block, shapes.masked_patches))
    out["patch_mask"] = np.stack([masking.block_mask(rng, block).reshape(-1)
                                  for _ in range(batch)])
  if kind != "image":
    length = shapes.paired_text_length if kind == "paired" else shapes.text_length
    vocab = shapes.text_vocab_size
    low = min(1000, vocab // 2)  # above the special ids
    ids = rng.integers(low, vocab, (batch, length)).astype(np.int32)
    mlm = masking.TokenMaskConfig(
        vocab_size=vocab, mask_id=MASK_ID % vocab, special_ids=(0,), rate=shapes.mlm_rate,
        max_predictions=shapes.paired_text_slots if kind == "paired" else shapes.text_slots)
    masked, labels = zip(*(masking.mask_tokens(row, rng, mlm) for row in ids))
    out.update(input_ids_masked=np.stack(masked).astype(np.int32),
               attention_mask=np.ones((batch, length), np.int32),
               mlm_labels=np.stack(labels).astype(np.int32))
    if kind == "paired":
      out["input_ids"] = ids
  return out


def transformers_inputs(kind: str, batch: dict[str, np.ndarray], itm_negative_rate: float,
                        seed: int = 0) -> dict[str, np.ndarray]:
  """The same batch as FlavaForPreTraining's keyword arguments (NCHW floats, int64 ids)."""
  out = {}
  if kind != "text":
    out["pixel_values"] = transforms.encoder_pixels(batch["pixels"]).transpose(0, 3, 1, 2)
    out["codebook_pixel_values"] = (batch["dvae_pixels"].astype(np.float32) / 255).transpose(
        0, 3, 1, 2)
    out["bool_masked_pos"] = batch["patch_mask"]
  if kind != "image":
    out.update(input_ids_masked=batch["input_ids_masked"].astype(np.int64),
               attention_mask=batch["attention_mask"].astype(np.int64),
               mlm_labels=batch["mlm_labels"].astype(np.int64))
  if kind == "paired":
    out["input_ids"] = batch["input_ids"].astype(np.int64)
    rng = np.random.default_rng(seed)
    rows = len(batch["input_ids"])
    out["itm_labels"] = (rng.random(rows) >= itm_negative_rate).astype(np.int64)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
