"""Canonical example -> the arrays of one batch row, per corpus kind (grain random_map functions).

    paired: pixels [S,S,3] f32, dvae_pixels [s,s,3] f32, patch_mask [P] bool, input_ids,
            input_ids_masked, attention_mask, mlm_labels [L] int32 (whole-word masking)
    image:  pixels, dvae_pixels, patch_mask
    text:   input_ids_masked, attention_mask, mlm_labels (token masking)

The keys are what FLAVA's steps read per kind; eval mode (`train=False`) takes the whole image with
no crop and no masks, and adds `label` and `input_ids` where the example has them. A bad example
becomes {"_skip": reason} (examples.py) for the batcher to count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flava_jax.data import masking, transforms
from flava_jax.data.examples import Skip, as_image_bytes, as_text
from flava_jax.data.tokenizer import Tokenizer
# What a corpus holds: image-caption pairs, images (optionally labelled), or text. A task says
# which kinds it trains on and which train step each kind feeds (flava_jax/tasks/).
KINDS = ("paired", "image", "text")


def pick_one(value: Any, rng: np.random.Generator | None) -> Any:
  """One caption out of several (COCO has five per image): random in training, else the first."""
  if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "OSU":
    value = list(value)
  if isinstance(value, (list, tuple)):
    if not value:
      return None
    return value[int(rng.integers(len(value)))] if rng is not None else value[0]
  return value


@dataclasses.dataclass
class ExampleProcessor:
  """Picklable per-example transform for one corpus kind."""

  kind: str
  image: transforms.ImageTransformConfig
  block_mask: masking.BlockMaskConfig
  tokenizer: Tokenizer | None
  text_length: int
  mlm: masking.TokenMaskConfig | None
  max_text_bytes: int = 1 << 20
  train: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"corpus kind {self.kind!r} is not one of {KINDS}")
    if self.kind != "image" and (self.tokenizer is None or self.mlm is None):
      raise ValueError(f"a {self.kind} corpus needs a tokenizer and MLM settings")

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if "_skip" in example:
      return example
    try:
      return self._process(example, rng)
    except Skip as e:
      return {"_skip": e.reason}

  def _image_features(self, example: dict, rng: np.random.Generator) -> dict:
    data = as_image_bytes(pick_one(example.get("image"), rng))
    if self.train:
      pixels, dvae_pixels = transforms.train_views_from_bytes(data, rng, self.image)
      patch_mask = masking.block_mask(rng, self.block_mask).reshape(-1)
    else:
      image = transforms.decode_rgb(data, self.image.max_pixels)
      pixels, dvae_pixels = transforms.eval_views(image, self.image)
      patch_mask = np.zeros(self.block_mask.grid_size**2, bool)
    return {"pixels": pixels, "dvae_pixels": dvae_pixels, "patch_mask": patch_mask}

  def _text_features(self, text: str, rng: np.random.Generator) -> dict:
    ids, attention_mask, word_starts = self.tokenizer.encode(text, self.text_length)
    out = {"attention_mask": attention_mask}
    if self.train:
      masked, labels = masking.mask_tokens(ids, rng, self.mlm,
                                           word_starts if self.mlm.whole_word else None)
      out.update(input_ids_masked=masked, mlm_labels=labels)
    if self.kind == "paired" or not self.train:
      out["input_ids"] = ids
    return out

  def _process(self, example: dict, rng: np.random.Generator) -> dict:
    rng = rng if self.train else None
    out = {}
    if self.kind == "text":
      text = as_text(example.get("text"), self.max_text_bytes)
      out.update(self._text_features(text, rng))
    else:
      if self.kind == "paired":  # the caption first: it is cheap to reject
        caption = as_text(pick_one(example.get("caption"), rng), self.max_text_bytes)
      out.update(self._image_features(example, rng))
      if self.kind == "paired":
        out.update(self._text_features(caption, rng))
    if not self.train and example.get("label") is not None:
      out["label"] = np.int32(example["label"])
    return out
