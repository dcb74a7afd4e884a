"""Image transforms of FLAVA's reference training code, in numpy/PIL with per-example rngs.

Train: one random resized crop (scale (0.9, 1.0), ratio (3/4, 4/3)) taken once and resized twice:
to 224 bicubic for the encoders and to 112 Lanczos for the dVAE. No horizontal flip unless asked.
Eval: the two resizes of the whole image. Views are uint8 HWC arrays (4x less to copy to the
device); `encoder_pixels` (RGB, /255, CLIP mean/std) finishes an encoder view into the encoders'
float input, and the task's train step does the same inside the jitted step (with the dVAE's own
pixel map for its view).
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from flava_jax.data.examples import Skip

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
  # JPEGs at least twice as large as the crop needs are decoded at 1/2, 1/4 or 1/8 scale in the
  # DCT domain (libjpeg's scaled decoding) before the resizes: much faster on large photos, and
  # close to, but not bit-equal with, the reference's full decode (off for exact reproduction).
  fast_decode: bool = False
  max_pixels: int = 100_000_000  # larger images are refused (decompression bombs, corrupt headers)


def _broken(e: Exception) -> BadImage:
  reason = "truncated_image" if "truncated" in str(e).lower() else "undecodable"
  return BadImage(reason, f"{type(e).__name__}: {e}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
  """Bytes -> a PIL image whose header has been read and checked (pixels not decoded yet)."""
  if not data:
    raise BadImage("empty_image")
  try:
    image = Image.open(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise _broken(e) from e
  if image.width * image.height > max_pixels:
    raise BadImage("too_large", f"{image.width}x{image.height} > {max_pixels} pixels")
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """Decodes `image` and converts any mode (grayscale, palette, RGBA, CMYK, 16-bit) to RGB;
  transparent pixels become white."""
  try:
    image.load()
  except Exception as e:  # pylint: disable=broad-except
    raise _broken(e) from e
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    scaled = np.asarray(image, np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or scaled.max() > 255 else 255.0
    image = Image.fromarray(np.clip(scaled / peak * 255.0, 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
  """Bytes -> an RGB PIL image. Grayscale, palette, RGBA, CMYK and 16-bit images are converted;
  empty, undecodable, truncated and oversized ones raise BadImage."""
  return to_rgb(open_image(data, max_pixels))


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


def encoder_pixels(rgb: Any) -> Any:
  """uint8 RGB -> the encoders' input: /255, CLIP mean/std (numpy or jax arrays; float32)."""
  return (rgb.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def _encoder_view(image: Image.Image, size: int, box=None) -> np.ndarray:
  """[size, size, 3] uint8, bicubic."""
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _dvae_view(image: Image.Image, size: int, box=None) -> np.ndarray:
  """[size, size, 3] uint8, Lanczos."""
  return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box))


def train_views(image: Image.Image, rng: np.random.Generator, cfg: ImageTransformConfig
                ) -> tuple[np.ndarray, np.ndarray]:
  """(encoder view [S, S, 3], dVAE view [s, s, 3]), uint8, of one random crop of an RGB image.

  The task's step (on the device) finishes them into float inputs."""
  left, top, w, h = random_resized_crop_box(image.width, image.height, rng, cfg.crop_scale,
                                            cfg.crop_ratio)
  return _crop_views(image, (left, top, left + w, top + h), rng, cfg)


def _crop_views(image: Image.Image, box: tuple[float, float, float, float],
                rng: np.random.Generator, cfg: ImageTransformConfig
                ) -> tuple[np.ndarray, np.ndarray]:
  if cfg.horizontal_flip and rng.random() < 0.5:
    image = image.crop(tuple(int(round(b)) for b in box)).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)
    box = None
  return _encoder_view(image, cfg.image_size, box), _dvae_view(image, cfg.dvae_size, box)


def train_views_from_bytes(data: bytes, rng: np.random.Generator, cfg: ImageTransformConfig
                           ) -> tuple[np.ndarray, np.ndarray]:
  """train_views of encoded bytes. The crop is drawn from the header's size before decoding, so
  that with cfg.fast_decode a large JPEG is decoded only at the scale the crop needs."""
  image = open_image(data, cfg.max_pixels)
  width, height = image.size
  left, top, w, h = random_resized_crop_box(width, height, rng, cfg.crop_scale, cfg.crop_ratio)
  reduction = 1
  if cfg.fast_decode and image.format == "JPEG":
    reduction = max(1, min(w, h) // cfg.image_size)
    reduction = 1 << min(3, reduction.bit_length() - 1)  # 1, 2, 4 or 8 (what libjpeg offers)
    if reduction > 1:
      image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
  image = to_rgb(image)
  sx, sy = image.width / width, image.height / height  # the scale draft actually chose
  return _crop_views(image, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), rng, cfg)


def eval_pixels(image: Image.Image, size: int) -> np.ndarray:
  """The encoders' eval view alone: the whole image resized to size x size (uint8)."""
  return _encoder_view(image, size)


def eval_views(image: Image.Image, cfg: ImageTransformConfig) -> tuple[np.ndarray, np.ndarray]:
  """The whole image resized to both views (uint8), no crop."""
  return _encoder_view(image, cfg.image_size), _dvae_view(image, cfg.dvae_size)
