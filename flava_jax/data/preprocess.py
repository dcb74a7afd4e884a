"""Canonical example -> the arrays of one batch row, per corpus kind (grain random_map functions).

    paired: pixels [S,S,3] f32, dvae_pixels [s,s,3] f32, patch_mask [P] bool, input_ids,
            input_ids_masked, attention_mask, mlm_labels [L] int32 (whole-word masking)
    image:  pixels, dvae_pixels, patch_mask
    text:   input_ids_masked, attention_mask, mlm_labels (token masking)

The keys are what FLAVA's steps read per kind; eval mode (`train=False`) takes the whole image with
no crop and no masks, and adds `label` and `input_ids` where the example has them. A bad example
becomes {"_skip": reason} (examples.py) for the batcher to count.

`ImageTextProcessor` is the BLIP-style processor of image-caption pairs: one augmented view (random
resized crop, flip, RandAugment) and a cleaned caption, no dVAE view and no masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from flava_jax.data import audio, masking, transforms
from flava_jax.data.captions import clean_caption, truncate_words
from flava_jax.data.examples import Skip, as_image_bytes, as_text
from flava_jax.data.randaugment import RandAugment
from flava_jax.data.tokenizer import Tokenizer
# What a corpus holds: image-caption pairs, images (optionally labelled), text, audio with its
# caption (speech and transcript), or an image with its caption and the caption's audio. A task says
# which kinds it trains on and which train step each kind feeds (flava_jax/tasks/).
KINDS = ("paired", "image", "text", "audio", "trimodal")


def pick_one(value: Any, rng: np.random.Generator | None) -> Any:
  """One caption out of several (COCO has five per image): random in training, else the first."""
  if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "OSU":
    value = list(value)
  if isinstance(value, (list, tuple)):
    if not value:
      return None
    return value[int(rng.integers(len(value)))] if rng is not None else value[0]
  return value


class _SkipsBadExamples:
  """Processors call `_process` and turn a Skip into {"_skip": reason} for the batcher to count;
  an example already marked bad passes through."""

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if "_skip" in example:
      return example
    try:
      return self._process(example, rng)
    except Skip as e:
      return {"_skip": e.reason}


@dataclasses.dataclass
class ExampleProcessor(_SkipsBadExamples):
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
    if self.kind not in ("paired", "image", "text"):
      raise ValueError(f"corpus kind {self.kind!r}: FLAVA-style processors read paired, image "
                       "and text corpora")
    if self.kind != "image" and (self.tokenizer is None or self.mlm is None):
      raise ValueError(f"a {self.kind} corpus needs a tokenizer and MLM settings")


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


@dataclasses.dataclass
class ImageTextProcessor(_SkipsBadExamples):
  """Picklable per-example transform of image-caption pairs as BLIP's reference prepares them.

  Train: a random caption (pick_one), cleaned (captions.clean_caption: lowercase, punctuation
  spaced out, cut to `max_words` words) and tokenised to `text_length`; the image decoded, one
  random resized crop (`crop_scale`, `crop_ratio`) resized bicubic to `image_size`, flipped
  left-right with probability 0.5 when `horizontal_flip`, then RandAugment(n, m) when
  `randaugment` is (n, m). Eval (`train=False`): the first caption, cleaned the same way, and the
  whole image resized bicubic to `image_size`, no crop and no augmentation; `label` is added
  where the example has one.

  Output: pixels uint8 [S, S, 3] (the task's step normalises them with the CLIP mean/std),
  input_ids and attention_mask int32 [L] ([CLS] caption [SEP], right-padded). A bad example
  becomes {"_skip": reason} as with ExampleProcessor; so does a caption that cleaning empties
  (reason "empty_text"), where the reference would train on an empty caption.
  """

  image_size: int
  tokenizer: Tokenizer
  text_length: int
  crop_scale: tuple[float, float] = (0.2, 1.0)  # BLIP pretraining; its fine-tuning uses (0.5, 1)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  horizontal_flip: bool = True
  randaugment: tuple = (2, 5)  # (n, m) or () for none
  max_words: int = 30  # 0: no cut
  clean_captions: bool = True  # False: captions as as_text leaves them (still cut to max_words)
  max_pixels: int = 100_000_000
  max_text_bytes: int = 1 << 20
  train: bool = True
  kind: str = "paired"  # the corpus kind it reads, as ExampleProcessor.kind
  prompt: str = ""  # prepended to every caption after cleaning ("a picture of ": captioning)

  def __post_init__(self):
    if self.kind != "paired":
      raise ValueError(f"ImageTextProcessor reads paired corpora, not {self.kind!r}")
    if self.tokenizer is None:
      raise ValueError("ImageTextProcessor needs a tokenizer")
    self.crop_scale = tuple(self.crop_scale)
    self.crop_ratio = tuple(self.crop_ratio)
    self.randaugment = tuple(self.randaugment)
    if len(self.randaugment) not in (0, 2):
      raise ValueError(f"randaugment={self.randaugment!r}: give (n, m) or () for none")
    # Validates n and m now rather than on the first example.
    self._augment = RandAugment(*self.randaugment) if self.randaugment else None


  def caption(self, value: Any) -> str:
    """A caption field's text as it is tokenised (cleaned and cut), or Skip."""
    text = as_text(value, self.max_text_bytes)
    text = (clean_caption(text, self.max_words) if self.clean_captions
            else truncate_words(text, self.max_words))
    if not text:
      raise Skip("empty_text", "nothing left after cleaning")
    return self.prompt + text

  def _pixels(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
    image = transforms.decode_rgb(data, self.max_pixels)
    if not self.train:
      return transforms.eval_pixels(image, self.image_size)
    left, top, w, h = transforms.random_resized_crop_box(image.width, image.height, rng,
                                                         self.crop_scale, self.crop_ratio)
    # Crop, then resize, as torchvision's RandomResizedCrop does: the bicubic filter sees only
    # the crop (resize(box=...) would also read the pixels just outside it).
    crop = image.crop((left, top, left + w, top + h))
    pixels = np.asarray(crop.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))
    # Flipping the resized crop equals resizing the flipped crop (the bicubic kernel and the
    # sampling grid are symmetric), and is cheaper.
    if self.horizontal_flip and rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    if self._augment is not None:
      pixels = self._augment(pixels, rng)
    return np.ascontiguousarray(pixels, np.uint8)  # [S, S, 3]

  def _process(self, example: dict, rng: np.random.Generator) -> dict:
    rng = rng if self.train else None
    caption = self.caption(pick_one(example.get("caption"), rng))  # cheap to reject: first
    pixels = self._pixels(as_image_bytes(pick_one(example.get("image"), rng)), rng)
    ids, attention_mask, _ = self.tokenizer.encode(caption, self.text_length)
    out = {"pixels": pixels, "input_ids": ids, "attention_mask": attention_mask}
    if not self.train and example.get("label") is not None:
      out["label"] = np.int32(example["label"])
    return out


@dataclasses.dataclass
class AudioTextProcessor(_SkipsBadExamples):
  """Picklable per-example transform of audio with its caption (audio and trimodal corpora; a
  trimodal example's image is not read).

  The audio field is decoded to 16 kHz mono (data/audio.decode_audio: repairs and skips), then
  cropped (a random window in training, the start in eval) or zero-padded to `samples`; in
  training, `time_masks` spans of up to `mask_width` samples are zeroed (SpecAugment-style). The
  caption is tokenised to `text_length` (the first caption in eval, a random one in training).

  Output: audio float32 [samples], audio_mask int32 [samples] (1: a real sample), input_ids and
  attention_mask int32 [text_length]. A bad example becomes {"_skip": reason}.
  """

  samples: int
  tokenizer: Tokenizer
  text_length: int
  time_masks: int = 0
  mask_width: int = 1600
  max_audio_seconds: float = 600.0
  max_text_bytes: int = 1 << 20
  train: bool = True
  kind: str = "audio"

  def __post_init__(self):
    if self.kind not in ("audio", "trimodal"):
      raise ValueError(f"AudioTextProcessor reads audio and trimodal corpora, not {self.kind!r}")
    if self.tokenizer is None:
      raise ValueError("AudioTextProcessor needs a tokenizer")
    if self.samples < 1:
      raise ValueError(f"samples={self.samples} must be positive")

  def _process(self, example: dict, rng: np.random.Generator) -> dict:
    rng = rng if self.train else None
    caption = as_text(pick_one(example.get("caption"), rng), self.max_text_bytes)
    wave, _ = audio.decode_audio(example.get("audio"), max_seconds=self.max_audio_seconds)
    wave, mask = audio.crop_or_pad(wave, self.samples, rng)
    if self.train and self.time_masks:
      wave = audio.time_mask(wave, mask, rng, self.time_masks, self.mask_width)
    ids, attention_mask, _ = self.tokenizer.encode(caption, self.text_length)
    out = {"audio": wave, "audio_mask": mask, "input_ids": ids,
           "attention_mask": attention_mask}
    if not self.train and example.get("label") is not None:
      out["label"] = np.int32(example["label"])
    return out


def choose(rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
  """[count] bool with round(rate * count) positions chosen uniformly (at least one when count
  > 0 and rate > 0)."""
  out = np.zeros(count, bool)
  if count and rate > 0:
    out[rng.choice(count, max(1, int(round(rate * count))), replace=False)] = True
  return out


def modality_presence(rng: np.random.Generator, rate: float, modalities: int = 3) -> np.ndarray:
  """[modalities] bool, True: present. Each is masked whole with probability `rate`, drawn
  again while all would be masked (so each is masked with probability
  (rate - rate^m) / (1 - rate^m), 0.2806 for 0.3 and three modalities)."""
  while True:
    present = rng.random(modalities) >= rate
    if present.any():
      return present


@dataclasses.dataclass
class TrimodalProcessor(_SkipsBadExamples):
  """Picklable per-example transform of an image, its caption and the caption's audio (trimodal
  corpora), for the tri-modal pretrainer (tasks/omni.py).

  Image: a random resized crop (`image`: ImageTransformConfig) with the encoder's view and the
  dVAE's (one code per patch); text: [CLS] caption [SEP] to `text_length`; audio: 16 kHz mono,
  a random window (eval: the start) cropped or zero-padded to `samples`. Training adds the
  masks the step reads: MLM (`mlm`: BERT's 80/10/10), `patch_rate` of the patches and
  `frame_rate` of the real audio frames (`frames`: the audio encoder's frame count of a sample
  count), each modality masked whole with `modality_rate` (never all three), and a sample-level
  class drawn uniformly from models/omni.MATCH_CLASSES' five.

  Output (train): pixels, dvae_pixels uint8; patch_mask bool [P]; input_ids, input_ids_masked,
  attention_mask, mlm_labels int32 [L]; audio float32 [samples], audio_mask int32 [samples];
  frame_mask bool [F]; present bool [3] (text, image, audio); match_class int32. Eval: pixels,
  dvae_pixels, input_ids, attention_mask, audio, audio_mask (and label where the example has
  one). A bad example becomes {"_skip": reason}.
  """

  image: transforms.ImageTransformConfig
  grid: int
  tokenizer: Tokenizer
  text_length: int
  mlm: masking.TokenMaskConfig
  samples: int
  frames: Any  # samples -> frames (models/audio.AudioConfig.frames)
  patch_rate: float = 0.15
  frame_rate: float = 0.15
  modality_rate: float = 0.3
  match_classes: int = 5
  max_audio_seconds: float = 600.0
  max_text_bytes: int = 1 << 20
  train: bool = True
  kind: str = "trimodal"

  def __post_init__(self):
    if self.kind != "trimodal":
      raise ValueError(f"TrimodalProcessor reads trimodal corpora, not {self.kind!r}")
    for name in ("patch_rate", "frame_rate"):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1)")
    if not 0 <= self.modality_rate < 1:
      raise ValueError(f"modality_rate={self.modality_rate} must be in [0, 1)")

  def _process(self, example: dict, rng: np.random.Generator) -> dict:
    rng = rng if self.train else None
    caption = as_text(pick_one(example.get("caption"), rng), self.max_text_bytes)
    data = as_image_bytes(pick_one(example.get("image"), rng))
    wave, _ = audio.decode_audio(example.get("audio"), max_seconds=self.max_audio_seconds)
    if self.train:
      pixels, dvae_pixels = transforms.train_views_from_bytes(data, rng, self.image)
    else:
      pixels, dvae_pixels = transforms.eval_views(
          transforms.decode_rgb(data, self.image.max_pixels), self.image)
    wave, audio_mask = audio.crop_or_pad(wave, self.samples, rng)
    ids, attention_mask, _ = self.tokenizer.encode(caption, self.text_length)
    out = {"pixels": pixels, "dvae_pixels": dvae_pixels, "input_ids": ids,
           "attention_mask": attention_mask, "audio": wave, "audio_mask": audio_mask}
    if self.train:
      masked, labels = masking.mask_tokens(ids, rng, self.mlm)
      total_frames = int(self.frames(self.samples))
      real_frames = int(self.frames(int(audio_mask.sum())))
      frame_mask = np.zeros(total_frames, bool)
      frame_mask[:real_frames] = choose(rng, real_frames, self.frame_rate)
      out.update(input_ids_masked=masked, mlm_labels=labels,
                 patch_mask=choose(rng, self.grid * self.grid, self.patch_rate),
                 frame_mask=frame_mask, present=modality_presence(rng, self.modality_rate),
                 match_class=np.int32(rng.integers(self.match_classes)))
    elif example.get("label") is not None:
      out["label"] = np.int32(example["label"])
    return out
