"""Image transforms of FLAVA's reference training code, in numpy/PIL with per-example rngs.

Train: one random resized crop (scale (0.9, 1.0), ratio (3/4, 4/3)) taken once and resized twice:
to 224 bicubic for the encoders (RGB, /255, CLIP mean/std) and to 112 Lanczos for the dVAE (/255,
then x -> 0.8 x + 0.1). No horizontal flip unless asked. Eval: the two resizes of the whole image.
Outputs are float32 HWC arrays.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from flava_jax.data.examples import Skip
from flava_jax.models.dvae import map_pixels

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class BadImage(Skip):
  """An image that cannot be decoded or is out of bounds; `reason` names the skip counter."""


@dataclasses.dataclass(frozen=True)
class ImageTransformConfig:
  image_size: int = 224
  dvae_size: int = 112
  crop_scale: tuple[float, float] = (0.9, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  horizontal_flip: bool = False
  max_pixels: int = 100_000_000  # larger images are refused (decompression bombs, corrupt headers)


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
  """Bytes -> an RGB PIL image. Grayscale, palette, RGBA, CMYK and 16-bit images are converted;
  empty, undecodable, truncated and oversized ones raise BadImage."""
  if not data:
    raise BadImage("empty_image")
  try:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
      raise BadImage("too_large", f"{image.width}x{image.height} > {max_pixels} pixels")
    image.load()
  except BadImage:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    reason = "truncated_image" if "truncated" in str(e).lower() else "undecodable"
    raise BadImage(reason, f"{type(e).__name__}: {e}") from e
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    scaled = np.asarray(image, np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or scaled.max() > 255 else 255.0
    image = Image.fromarray(np.clip(scaled / peak * 255.0, 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float]
                            ) -> tuple[int, int, int, int]:
  """(left, top, crop_width, crop_height): the usual 10 tries, then a centre crop fallback."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _encoder_view(image: Image.Image, size: int) -> np.ndarray:
  pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
  return (pixels - CLIP_MEAN) / CLIP_STD


def _dvae_view(image: Image.Image, size: int) -> np.ndarray:
  pixels = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), np.float32) / 255.0
  return map_pixels(pixels)


def train_views(image: Image.Image, rng: np.random.Generator, cfg: ImageTransformConfig
                ) -> tuple[np.ndarray, np.ndarray]:
  """(encoder view [S, S, 3], dVAE view [s, s, 3]) of one random crop."""
  left, top, w, h = random_resized_crop_box(image.width, image.height, rng, cfg.crop_scale,
                                            cfg.crop_ratio)
  crop = image.crop((left, top, left + w, top + h))
  if cfg.horizontal_flip and rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return _encoder_view(crop, cfg.image_size), _dvae_view(crop, cfg.dvae_size)


def eval_views(image: Image.Image, cfg: ImageTransformConfig) -> tuple[np.ndarray, np.ndarray]:
  """The whole image resized to both views, no crop."""
  return _encoder_view(image, cfg.image_size), _dvae_view(image, cfg.dvae_size)
