"""RandAugment as BLIP's reference training transform uses it, in numpy/PIL with an explicit rng.

BLIP (transform/randaugment.py, composed in data/__init__.py) draws N operations uniformly, with
replacement, from its list; each drawn operation is then applied with probability 0.5, at the
fixed magnitude M out of MAX_LEVEL=10. BLIP uses N=2, M=5 over

    Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX, ShearY, TranslateX,
    TranslateY, Rotate

Magnitude -> argument, for level m:
    Brightness, Sharpness   factor = m / 10 * 1.8 + 0.1   (m=5: 1.0, so both leave the image as
                            it is at BLIP's setting: only the other ops change pixels there)
    ShearX, ShearY          shear = m / 10 * 0.3, negated with probability 0.5
    TranslateX, TranslateY  offset = m / 10 * 10 pixels (absolute, whatever the image size),
                            negated with probability 0.5
    Rotate                  angle = m / 10 * 30 degrees, negated with probability 0.5
    Identity, AutoContrast, Equalize  no argument
Geometric ops fill uncovered pixels with grey (128, 128, 128) and sample bilinearly.

The random draws happen in the reference's order (the N op indices, then per op: the
apply-or-skip draw, then the sign draw for signed ops) but from the caller's np.random.Generator,
never from global state, so a per-example rng reproduces an example's augmentation exactly.

Differences from the reference, which uses cv2 (not a dependency here):
  * Geometric ops use PIL's Image.transform (bilinear) with cv2's geometry: the same forward
    affine maps (shear about the top-left corner, rotation about (W/2, H/2) in cv2's
    pixel-centre coordinates, counter-clockwise for positive angles), translated into PIL's
    half-pixel convention. Checked against the reference functions with opencv-python 4.14 on
    96x128 images: whole-pixel translations (BLIP's +-5 at M=5) are identical; for shears,
    rotations and fractional shifts the pixels the source covers differ by at most 1 on smooth
    images (at most 6 on white noise, where cv2's 1/32-pixel quantised sample positions show);
    only the one-pixel band along the edge of the covered region differs more, because cv2
    blends it with the fill colour where PIL clamps to the edge pixel or fills.
  * Sharpness clips the blended values to [0, 255] before truncating to uint8 (the reference
    casts without clipping, which wraps around for factors above 1); for factors in [0, 1] it is
    identical to the reference. BLIP's M=5 makes the factor exactly 1, where both return the
    image unchanged.
  * AutoContrast is PIL.ImageOps.autocontrast (no cutoff), which the reference's docstring says
    it reproduces. The reference's code does not quite: it negates the channel minimum as a
    numpy uint8 scalar, which wraps around (-low becomes 256 - low), so every channel whose
    minimum is above 0 comes out solid 255; channels that reach 0 are stretched correctly. That
    overflow is not reproduced here.
  * Equalize and Brightness are the reference's lookup tables computed with numpy and are exact
    (Equalize equals PIL.ImageOps.equalize).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 10.0  # the offset at the maximum level (the reference's translate_const)
APPLY_PROBABILITY = 0.5
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY",
            "TranslateX", "TranslateY", "Rotate")


# --- the operations (uint8 [H, W, 3] -> uint8 [H, W, 3]) -------------------------------------

def identity(image: np.ndarray) -> np.ndarray:
  return image


def _per_channel(image: np.ndarray, table_fn) -> np.ndarray:
  """Applies a 256-entry uint8 lookup table made per channel by table_fn(channel)."""
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    table = table_fn(image[..., c])
    out[..., c] = image[..., c] if table is None else table[image[..., c]]
  return out


def _autocontrast_table(channel: np.ndarray) -> np.ndarray | None:
  low, high = int(channel.min()), int(channel.max())
  if high <= low:
    return None
  scale = 255.0 / (high - low)
  return np.clip(np.arange(256) * scale - low * scale, 0, 255).astype(np.uint8)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Stretches each channel linearly so its darkest value is 0 and its brightest 255."""
  return _per_channel(image, _autocontrast_table)


def _equalize_table(channel: np.ndarray) -> np.ndarray | None:
  hist = np.bincount(channel.reshape(-1), minlength=256)
  used = hist[hist != 0]
  step = int(used[:-1].sum()) // 255  # every count but the last used bin's, over 255
  if step == 0:
    return None
  shifted = np.concatenate([[step // 2], hist[:-1]])
  return np.clip(np.cumsum(shifted) // step, 0, 255).astype(np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation with PIL's rounding (not cv2.equalizeHist's)."""
  return _per_channel(image, _equalize_table)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Every value multiplied by `factor` (0 black, 1 unchanged), clipped and truncated."""
  table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
  return table[image]


def _smoothed(image: np.ndarray) -> np.ndarray:
  """The 3x3 smoothing filter [[1,1,1],[1,5,1],[1,1,1]] / 13 (PIL's SMOOTH, the reference's
  kernel), reflecting the border without repeating the edge (cv2's default), rounded to uint8."""
  padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  total = 4.0 * padded[1:h + 1, 1:w + 1]  # the centre's extra weight (5 = 1 + 4)
  for dy in range(3):
    for dx in range(3):
      total = total + padded[dy:dy + h, dx:dx + w]
  return np.clip(np.rint(total / 13.0), 0, 255).astype(np.uint8)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends the image with its smoothed copy: 0 smoothed, 1 unchanged, above 1 sharper. As in
  the reference the one-pixel border keeps its values unless factor is 0."""
  if factor == 1.0:
    return image
  degenerate = _smoothed(image)
  if factor == 0.0:
    return degenerate
  out = image.copy()
  inner = degenerate[1:-1, 1:-1].astype(np.float32)
  blended = inner + np.float32(factor) * (image[1:-1, 1:-1].astype(np.float32) - inner)
  out[1:-1, 1:-1] = np.clip(blended, 0, 255).astype(np.uint8)
  return out


def _warp(image: np.ndarray, forward: np.ndarray, fill=FILL) -> np.ndarray:
  """Moves the pixel at (x, y) to forward @ (x, y, 1): a 2x3 affine map in cv2's convention
  (pixel centres at integer coordinates), like cv2.warpAffine with a constant border."""
  linear, shift = forward[:, :2], forward[:, 2]
  inverse = np.linalg.inv(linear)  # output position -> input position
  offset = -inverse @ shift
  # PIL samples output pixel centres at (x + 0.5, y + 0.5) and reads the input in the same
  # half-pixel coordinates: shift the inverse map by half a pixel on both sides.
  half = np.array([0.5, 0.5])
  offset = offset + half - inverse @ half
  data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
  pil = Image.fromarray(image)
  out = pil.transform(pil.size, Image.Transform.AFFINE, tuple(float(v) for v in data),
                      Image.Resampling.BILINEAR, fillcolor=tuple(fill))
  return np.asarray(out)


def shear_x(image: np.ndarray, shear: float, fill=FILL) -> np.ndarray:
  """(x, y) -> (x + shear * y, y): rows slide right in proportion to their distance from the top."""
  return _warp(image, np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]), fill)


def shear_y(image: np.ndarray, shear: float, fill=FILL) -> np.ndarray:
  """(x, y) -> (x, y + shear * x)."""
  return _warp(image, np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]]), fill)


def translate_x(image: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
  """(x, y) -> (x - offset, y): the content moves `offset` pixels left (right if negative)."""
  return _warp(image, np.array([[1.0, 0.0, -offset], [0.0, 1.0, 0.0]]), fill)


def translate_y(image: np.ndarray, offset: float, fill=FILL) -> np.ndarray:
  """(x, y) -> (x, y - offset): the content moves `offset` pixels up."""
  return _warp(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -offset]]), fill)


def rotation_matrix(width: int, height: int, degrees: float) -> np.ndarray:
  """cv2.getRotationMatrix2D((W/2, H/2), degrees, 1): counter-clockwise on screen for positive
  angles, about (W/2, H/2) in pixel-centre coordinates."""
  cx, cy = width / 2, height / 2
  a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def rotate(image: np.ndarray, degrees: float, fill=FILL) -> np.ndarray:
  return _warp(image, rotation_matrix(image.shape[1], image.shape[0], degrees), fill)


# --- magnitudes -------------------------------------------------------------------------------

def _signed(value: float, rng: np.random.Generator, negate_above: bool) -> float:
  """`value` negated with probability 0.5 (the reference negates shears and translations when
  its draw is above 0.5 and rotations when it is below: the same odds, kept draw for draw)."""
  draw = rng.random()
  return -value if (draw > 0.5 if negate_above else draw < 0.5) else value


def op_argument(name: str, level: float, rng: np.random.Generator) -> tuple:
  """The arguments of op `name` at `level` (out of MAX_LEVEL), drawing a sign where it has one."""
  fraction = level / MAX_LEVEL
  if name in ("Identity", "AutoContrast", "Equalize"):
    return ()
  if name in ("Brightness", "Sharpness"):
    return (fraction * 1.8 + 0.1,)
  if name in ("ShearX", "ShearY"):
    return (_signed(fraction * 0.3, rng, negate_above=True),)
  if name in ("TranslateX", "TranslateY"):
    return (_signed(fraction * TRANSLATE_PIXELS, rng, negate_above=True),)
  if name == "Rotate":
    return (_signed(fraction * 30.0, rng, negate_above=False),)
  raise ValueError(f"unknown RandAugment op {name!r}; known: {tuple(OPS)}")


OPS = {"Identity": identity, "AutoContrast": autocontrast, "Brightness": brightness,
       "Sharpness": sharpness, "Equalize": equalize, "ShearX": shear_x, "ShearY": shear_y,
       "TranslateX": translate_x, "TranslateY": translate_y, "Rotate": rotate}


def apply_op(name: str, image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  """One op at `level`, always applied (its sign, if any, drawn from rng)."""
  return OPS[name](image, *op_argument(name, level, rng))


def as_rgb_array(image) -> np.ndarray:
  """A PIL image (any mode) or a uint8 [H, W, 3] array -> a uint8 [H, W, 3] array."""
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"RandAugment takes uint8 [H, W, 3] images, not {image.dtype} "
                     f"{image.shape}")
  return image


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """N ops drawn with replacement from `ops`, each applied with probability 0.5 at level m."""

  n: int = 2
  m: float = 5
  ops: tuple[str, ...] = BLIP_OPS

  def __post_init__(self):
    unknown = [o for o in self.ops if o not in OPS]
    if unknown or not self.ops:
      raise ValueError(f"RandAugment ops {unknown or '()'} are not among {tuple(OPS)}")
    if self.n < 0 or not 0 <= self.m <= MAX_LEVEL:
      raise ValueError(f"RandAugment(n={self.n}, m={self.m}): need n >= 0, 0 <= m <= "
                       f"{MAX_LEVEL}")

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] (or a PIL image) -> uint8 [H, W, 3]."""
    image = as_rgb_array(image)
    chosen = rng.integers(0, len(self.ops), size=self.n)
    for index in chosen:
      if rng.random() > APPLY_PROBABILITY:
        continue
      image = apply_op(self.ops[int(index)], image, self.m, rng)
    return image
