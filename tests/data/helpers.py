"""Data the data tests make themselves: encoded images, our own shards, a tiny TFDS dataset."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from flava_jax.data import records


def jpeg(colour=(200, 30, 30), size=(24, 20)) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size, colour).save(out, "JPEG", quality=90)
  return out.getvalue()


def write_shards(prefix: str, examples: list, num_shards: int = 2) -> list[str]:
  """Writes records (dicts) or raw bytes (to make corrupt records) round robin over shards."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  paths = records.shard_paths(prefix, num_shards)
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  for i, e in enumerate(examples):
    writers[i % num_shards].write(e if isinstance(e, bytes) else records.encode_record(e))
  for w in writers:
    w.close()
  return paths


def write_tfds_dataset(data_dir: str, n: int = 6) -> None:
  """A tiny TFDS dataset `tiny_captions` (ArrayRecord files) with nested captions and labels."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n)}

    def _generate_examples(self, count):
      for i in range(count):
        yield i, {"image": io.BytesIO(jpeg((20 * i, 100, 50))),
                  "captions": {"text": [f"caption {i} a", f"caption {i} b"]},
                  "label": i % 3}

  TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()


def as_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
