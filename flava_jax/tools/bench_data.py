"""Input pipeline throughput: examples/s per corpus and for the mixture, from JPEG bytes.

    python -m flava_jax.tools.bench_data --config=configs/flava.py:full
    python -m flava_jax.tools.bench_data --config=configs/flava.py:full --workers=16 --batch=256

It writes a synthetic corpus of photo-like JPEGs (default 640x480, COCO's typical size) with
captions, plus the embedded text, into a temporary directory, then runs the configured transforms
(crop, the encoder and dVAE views, block masks, tokenisation, MLM masking) through the real
pipeline:
- each corpus alone in this process with one read thread: examples/s on one core;
- the weighted mixture with --workers grain worker processes: examples/s in total and per worker.
Both with and without `fast_decode` (JPEG DCT-domain downscaling) unless --fast_decode is given.
Figures only: nothing here asserts a speed.

    python -m flava_jax.tools.bench_data --write_corpus=DIR [--examples=512]

only writes that corpus to DIR (DIR/paired, DIR/image, DIR/text) and the flags that train the
binary on it to DIR/flags.txt (also printed): `python -m flava_jax.main --config=...
$(cat DIR/flags.txt)` is a loop of the whole binary on a real pipeline.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from flava_jax import experiment
from flava_jax.data import embedded, records

config_flags.DEFINE_config_file("config", "configs/flava.py:full", "model/data config")
flags.DEFINE_integer("batch", 64, "examples per batch (per step)")
flags.DEFINE_integer("batches", 12, "batches timed per measurement (after one warm-up batch)")
flags.DEFINE_integer("workers", 0, "grain worker processes for the mixture (0: os.cpu_count())")
flags.DEFINE_integer("examples", 256, "distinct synthetic images written")
flags.DEFINE_string("image_size", "640x480", "WIDTHxHEIGHT of the synthetic JPEGs")
flags.DEFINE_enum("fast_decode", "both", ["both", "true", "false"], "which decode paths to time")
flags.DEFINE_float("need", 0.0, "a train step's examples/s: also print how many cores the "
                   "mixture needs to feed it (at the measured examples/s per worker)")
flags.DEFINE_string("write_corpus", "", "only write the synthetic corpus to this directory and "
                    "print the binary's flags that read it")

CAPTION_WORDS = ("a man riding a wave on top of a surfboard in the ocean near a sandy beach with "
                 "two dogs and a red bus parked next to an old brick building").split()


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """Smooth colour fields plus fine noise: JPEG sizes and decode costs like real photos."""
  coarse = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                     np.int16)
  image = image + rng.integers(-12, 13, image.shape)
  out = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def write_corpus(root: str, examples: int, width: int, height: int) -> dict[str, str]:
  """Shards for a paired, an image and a text corpus; returns {kind: directory}."""
  rng = np.random.default_rng(0)
  dirs = {kind: os.path.join(root, kind) for kind in ("paired", "image", "text")}
  with records.ShardWriter(os.path.join(dirs["paired"], "p"), 4) as paired, \
      records.ShardWriter(os.path.join(dirs["image"], "i"), 4) as image:
    for i in range(examples):
      data = photo_jpeg(rng, width, height)
      words = rng.choice(CAPTION_WORDS, size=int(rng.integers(8, 16)))
      paired.write({"image": data, "caption": " ".join(words)})
      image.write({"image": data, "label": i % 10})
  with records.ShardWriter(os.path.join(dirs["text"], "t"), 4) as text:
    for chunk in embedded.text_examples():
      text.write({"text": chunk})
  return dirs


# write_corpus's directory holds the binary's flags for its shards in this file.
FLAGS_FILE = "flags.txt"


def corpus_flags(dirs: dict[str, str]) -> list[str]:
  """The binary's flags that train on write_corpus's shards (in the config's mixture weights)."""
  out = []
  for kind, path in dirs.items():
    out += [f"--config.data.corpora.{kind}.source=array_record",
            f"--config.data.corpora.{kind}.paths={path}"]
  return out


def _config(base, dirs: dict[str, str], kinds: tuple[str, ...], batch: int, workers: int,
            threads: int, fast_decode: bool):
  config = base.copy_and_resolve_references()
  config.global_batch = batch
  config.data.corpora = {k: dict(kind=k, weight=base.data.corpora[k].weight,
                                 source="array_record", paths=dirs[k]) for k in kinds}
  config.data.worker_count = workers
  config.data.read_threads = threads
  config.data.fast_decode = fast_decode
  return config


def measure(config, batches: int) -> tuple[float, dict[str, int]]:
  """(examples/s, batches per corpus) over `batches` batches after one warm-up batch."""
  it = experiment.make_pipeline(config, 0, 1)
  try:
    next(it)
    it.batches.clear()
    start = time.perf_counter()
    rows = 0
    for _ in range(batches):
      _, batch = next(it)
      rows += len(next(iter(batch.values())))
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return rows / seconds, dict(it.batches)


def main(argv):
  del argv
  f = flags.FLAGS
  width, height = (int(v) for v in f.image_size.lower().split("x"))
  workers = f.workers or os.cpu_count() or 1
  decodes = {"both": (False, True), "true": (True,), "false": (False,)}[f.fast_decode]
  cfg = f.config
  if f.write_corpus:
    start = time.perf_counter()
    dirs = write_corpus(f.write_corpus, f.examples, width, height)
    print(f"wrote {f.examples} {width}x{height} JPEGs with captions and the embedded text to "
          f"{f.write_corpus} in {time.perf_counter() - start:.1f} s; the binary's flags:")
    line = " ".join(corpus_flags(dirs))
    with open(os.path.join(f.write_corpus, FLAGS_FILE), "w") as out:
      out.write(line + "\n")
    print(line)
    return
  print(f"config {cfg.variant}: images {cfg.model.image.image_size} px (dVAE view "
        f"{cfg.model.image.image_size // cfg.model.image.patch_size * 8} px), paired text "
        f"{cfg.paired_text_length} tokens, text {cfg.text_length} tokens; JPEGs {width}x{height};"
        f" batch {f.batch}; {os.cpu_count()} cores")
  with tempfile.TemporaryDirectory(prefix="flava_bench_data.") as root:
    dirs = write_corpus(root, f.examples, width, height)
    for fast in decodes:
      print(f"\nfast_decode={fast}")
      print(f"  {'corpus':<10}{'processes':>10}{'examples/s':>13}{'per core':>11}")
      for kind in ("paired", "image", "text"):
        rate, _ = measure(_config(cfg, dirs, (kind,), f.batch, 0, 1, fast), f.batches)
        print(f"  {kind:<10}{1:>10}{rate:>13.1f}{rate:>11.1f}")
      rate, counts = measure(
          _config(cfg, dirs, ("paired", "image", "text"), f.batch, workers, 1, fast),
          max(f.batches, 2 * workers))
      print(f"  {'mixture':<10}{workers:>10}{rate:>13.1f}{rate / workers:>11.1f}"
            f"   batches {counts}")
      if f.need:
        cores = math.ceil(f.need * workers / rate)
        print(f"  feeding {f.need:,.0f} examples/s takes about {cores} worker "
              f"core{'s' if cores > 1 else ''} at {rate / workers:.1f} examples/s each")


if __name__ == "__main__":
  app.run(main)
