"""A folder holding the builder's paired, image and text shards side by side, as users make it:
`python -m flava_jax.data.build --kind=KIND --out=DIR` three times with the same DIR."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from flava_jax.data import build


def _jpeg(seed: int, size: int = 24) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=90)
  return out.getvalue()


def _put(path: str, data: bytes | str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)


def inputs(root: str, paired: int = 6, images: int = 8, texts: int = 5) -> dict[str, str]:
  """Builder inputs: captioned images (JSONL), class sub-folders, a text file; {kind: path}."""
  lines = []
  for i in range(paired):
    _put(os.path.join(root, "pairs", f"p{i}.jpg"), _jpeg(i))
    lines.append(json.dumps({"image": f"p{i}.jpg", "caption": f"a picture number {i}"}))
  _put(os.path.join(root, "pairs", "captions.jsonl"), "\n".join(lines) + "\n")
  for i in range(images):
    _put(os.path.join(root, "classes", ("cat", "dog")[i % 2], f"i{i}.jpg"), _jpeg(100 + i))
  paragraphs = [f"paragraph {i} of a rather short book about nothing much" for i in range(texts)]
  _put(os.path.join(root, "docs", "book.txt"), "\n\n".join(paragraphs))
  return {"paired": os.path.join(root, "pairs", "captions.jsonl"),
          "image": os.path.join(root, "classes"), "text": os.path.join(root, "docs")}


def mixed_folder(root: str, kinds=("paired", "image", "text"), **sizes) -> tuple[str, dict]:
  """One output folder with a build of each kind: (folder, {kind: examples written})."""
  paths = inputs(os.path.join(root, "inputs"), **sizes)
  out = os.path.join(root, "shards")
  written = {}
  for kind in kinds:
    summary = build.build(kind, paths[kind], out, num_shards=2, text_chars=40)
    written[kind] = summary.written
  return out, written
