"""The embedded default corpus: needs no download, built on first use and cached.

- paired: procedurally drawn scenes (shapes of given colours, sizes, counts and positions on a
  plain background) with captions that describe them, so that retrieval and zero-shot figures
  measure something real.
- image: single-kind scenes labelled by (colour, shape): 32 classes named like "red circle".
- text: English prose for MLM, the documentation topics that ship with Python (pydoc_data).
- vocab.txt: a small WordPiece vocabulary trained on the captions and the text.

Every part has a train and a held-out test split (test captions are unique, so retrieval has one
right answer per query). Everything is drawn from fixed seeds: two builds are byte-identical.
The shards are our own ArrayRecord format (records.py), read through the same path as user data.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from flava_jax.data import records, tokenizer

VERSION = 1  # bump when the generator changes: the cache directory is named after it
IMAGE_SIZE = 128
VOCAB_SIZE = 1024
PARTS = ("paired", "image", "text")
SPLITS = ("train", "test")
SIZES = {("paired", "train"): 6000, ("paired", "test"): 256,
         ("image", "train"): 2000, ("image", "test"): 320}
TEXT_CHARS = 400  # characters per text example (paragraphs joined up to this)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (140, 60, 180), "orange": (245, 135, 30),
           "black": (25, 25, 25), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle", "diamond")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
              "at the bottom": (0.5, 0.75), "in the middle": (0.5, 0.5)}
_RADIUS = {"small": (9, 13), "large": (20, 26)}
_BACKGROUNDS = ((250, 250, 250), (225, 225, 225), (240, 230, 210), (215, 230, 240))
_PREFIXES = ("", "a picture of ", "an image with ", "a drawing of ")


def default_cache_dir() -> str:
  return os.environ.get("FLAVA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                        "flava_jax"))


def corpus_dir(cache_dir: str = "") -> str:
  return os.path.join(cache_dir or default_cache_dir(), f"embedded-v{VERSION}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
  elif shape == "square":
    s = r * 0.9
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)],
                 fill=colour)
  else:  # diamond
    draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)],
                 fill=colour)


def _place(rng: np.random.Generator, r: float, taken: list, around=None) -> tuple[float, float]:
  """A centre for a shape of radius r that avoids the shapes already placed (best effort)."""
  best = None
  for _ in range(60):
    if around is None:
      cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
    else:
      cx, cy = (np.asarray(around) * IMAGE_SIZE + rng.normal(0, 6, size=2)).clip(
          r + 2, IMAGE_SIZE - r - 2)
    gap = min((math.hypot(cx - x, cy - y) - r - q for x, y, q in taken), default=1e9)
    if best is None or gap > best[0]:
      best = (gap, cx, cy)
    if gap > 3:
      break
  return best[1], best[2]


def _render(groups: list[dict], rng: np.random.Generator, position=None) -> bytes:
  background = np.asarray(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))])
  image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in background))
  draw = ImageDraw.Draw(image)
  taken = []
  for g in groups:
    for _ in range(g["count"]):
      r = rng.uniform(*_RADIUS[g["size"]])
      cx, cy = _place(rng, r, taken, around=position)
      taken.append((cx, cy, r))
      _draw_shape(draw, g["shape"], cx, cy, r, COLOURS[g["colour"]])
  pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
  out = io.BytesIO()
  Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def _group(rng: np.random.Generator, count: int | None = None) -> dict:
  colours = list(COLOURS)
  return dict(colour=colours[rng.integers(len(colours))], shape=SHAPES[rng.integers(len(SHAPES))],
              size=("small", "large")[rng.integers(2)],
              count=int(count if count is not None else rng.integers(1, 4)))


def _phrase(g: dict) -> str:
  noun = g["shape"] + ("s" if g["count"] > 1 else "")
  return f"{_COUNT_WORDS[g['count']]} {g['size']} {g['colour']} {noun}"


def paired_example(rng: np.random.Generator) -> dict:
  """One scene and its caption."""
  if rng.random() < 0.4:  # one shape, placed: "a small red circle on the left"
    g = _group(rng, count=1)
    where = list(_POSITIONS)[rng.integers(len(_POSITIONS))]
    caption = f"{_phrase(g)} {where}"
    image = _render([g], rng, position=_POSITIONS[where])
  else:
    groups = [_group(rng) for _ in range(1 + int(rng.random() < 0.5))]
    if len(groups) == 2 and groups[0]["colour"] == groups[1]["colour"] and (
        groups[0]["shape"] == groups[1]["shape"]):
      groups = groups[:1]
    caption = " and ".join(_phrase(g) for g in groups)
    image = _render(groups, rng)
  caption = _PREFIXES[rng.integers(len(_PREFIXES))] + caption
  return {"image": image, "caption": caption}


def image_example(rng: np.random.Generator) -> dict:
  """A scene of one (colour, shape) class, labelled with its index in CLASS_NAMES."""
  g = _group(rng)
  return {"image": _render([g], rng), "label": CLASS_NAMES.index(f"{g['colour']} {g['shape']}")}


def text_examples() -> list[str]:
  """Python's documentation topics, as paragraphs joined up to about TEXT_CHARS characters."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  chunks = []
  for key in sorted(topics.topics):
    current = ""
    for paragraph in topics.topics[key].split("\n\n"):
      paragraph = " ".join(paragraph.split())
      if len(paragraph) < 40:  # headings, rules and code fragments
        continue
      current = f"{current} {paragraph}".strip()
      if len(current) >= TEXT_CHARS:
        chunks.append(current)
        current = ""
    if current:
      chunks.append(current)
  return chunks


def _part_records(part: str, split: str) -> list[dict]:
  if part == "text":
    chunks = text_examples()
    keep = (lambda i: i % 10 == 9) if split == "test" else (lambda i: i % 10 != 9)
    return [{"text": c, "id": f"text/{i}"} for i, c in enumerate(chunks) if keep(i)]
  rng = np.random.default_rng([VERSION, PARTS.index(part), SPLITS.index(split)])
  make = paired_example if part == "paired" else image_example
  out, seen = [], set()
  while len(out) < SIZES[(part, split)]:
    example = make(rng)
    if split == "test" and part == "paired":  # one right answer per retrieval query
      if example["caption"] in seen:
        continue
      seen.add(example["caption"])
    out.append(dict(example, id=f"{part}/{split}/{len(out)}"))
  return out


def build(out_dir: str) -> None:
  """Writes every part and split, the class names and the vocabulary into out_dir."""
  texts = []
  for part in PARTS:
    for split in SPLITS:
      examples = _part_records(part, split)
      with records.ShardWriter(os.path.join(out_dir, f"{part}-{split}")) as writer:
        for example in examples:
          writer.write(example)
      if split == "train":
        texts += [e.get("caption") or e.get("text") for e in examples if "label" not in e]
  with open(os.path.join(out_dir, "classes.json"), "w") as f:
    json.dump(list(CLASS_NAMES), f)
  texts += [f"a photo of a {name}" for name in CLASS_NAMES]
  tokenizer.train_wordpiece(texts, VOCAB_SIZE, os.path.join(out_dir, "vocab.txt"))


def ensure(cache_dir: str = "") -> str:
  """The corpus directory, built first if absent (atomically: concurrent callers are safe)."""
  final = corpus_dir(cache_dir)
  if os.path.isfile(os.path.join(final, "vocab.txt")):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(final) + ".", dir=os.path.dirname(final))
  try:
    build(staging)
    try:
      os.rename(staging, final)
    except OSError:  # another process finished first; its copy is identical
      if not os.path.isfile(os.path.join(final, "vocab.txt")):
        raise
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return final


def shard_pattern(part: str, split: str, cache_dir: str = "") -> str:
  if part not in PARTS or split not in SPLITS:
    raise ValueError(f"embedded corpus has parts {PARTS} and splits {SPLITS}, not "
                     f"{part!r}/{split!r}")
  return os.path.join(ensure(cache_dir), f"{part}-{split}-*{records.SHARD_SUFFIX}")


def vocab_file(cache_dir: str = "") -> str:
  return os.path.join(ensure(cache_dir), "vocab.txt")


def class_names() -> tuple[str, ...]:
  return CLASS_NAMES
