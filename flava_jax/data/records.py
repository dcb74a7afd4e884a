"""flava_jax's own ArrayRecord shards: one msgpack map per record.

A record holds any of these fields (absent ones are simply missing):
    image:   bytes, the encoded image file as it was found (JPEG, PNG, ...)
    caption: str, the text paired with the image
    label:   int, a class index (image folders, classification sets)
    text:    str, a text-only example
    id:      str, where the example came from (file name, key), for debugging and dedup
  and, in evaluation splits:
    captions: list of str, every caption of the image (retrieval)
    text_pair: str, the second sentence of a sentence-pair task
    question, answers: str and the annotators' answers (list of str), VQA
    hypothesis: str, visual entailment
  and, in CapFilt's corpora (data/embedded.py's web part, tools/capfilt.py's output):
    origin: str, where a caption came from: human, web or synthetic (written by the captioner)
    match: float, the filter's ITM match probability of the pair
    noise, scene: str, the embedded web part's recorded corruption and scene (JSON), kept for
                  measurement only
  and, in audio corpora (build.py --kind=audio|trimodal, the embedded spoken part):
    audio:   bytes, an encoded audio file (WAV, FLAC, OGG, ...; data/audio.py decodes it)
    voice:   str, the spoken part's eSpeak NG voice (JSON: name, rate, pitch), for measurement

Shards are `PREFIX-00000-of-00004.array_record`, written with group_size 1 so that every record
can be read on its own (random access for grain's global shuffle).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import msgpack

# Training corpora use the first five; evaluation splits add several captions per image, sentence
# pairs, VQA questions with their annotators' answers and entailment hypotheses; CapFilt the rest.
FIELDS = ("image", "caption", "label", "text", "id", "captions", "text_pair", "question",
          "answers", "hypothesis", "origin", "match", "noise", "scene", "audio", "voice")
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # every record readable on its own (random access)


def encode_record(example: dict[str, Any]) -> bytes:
  unknown = set(example) - set(FIELDS)
  if unknown:
    raise ValueError(f"unknown record fields {sorted(unknown)}; records hold {FIELDS}")
  return msgpack.packb({k: v for k, v in example.items() if v is not None}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """bytes -> dict; raises ValueError for anything that is not one of our records."""
  try:
    record = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several types)
    raise ValueError(f"not a msgpack record: {type(e).__name__}: {e}") from e
  if not isinstance(record, dict):
    raise ValueError(f"record is a {type(record).__name__}, not a map")
  return record


def shard_paths(prefix: str, num_shards: int) -> list[str]:
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}" for i in range(num_shards)]


def find_shards(pattern: str | Sequence[str]) -> list[str]:
  """Shard paths from a directory, a glob, a single file or a list of those (sorted, unique)."""
  patterns = [pattern] if isinstance(pattern, str) else list(pattern)
  paths = []
  for p in patterns:
    p = os.path.expanduser(p)
    if os.path.isdir(p):
      paths += glob.glob(os.path.join(p, f"*{SHARD_SUFFIX}*"))
    else:
      paths += glob.glob(p)
  return sorted(set(paths))


@dataclasses.dataclass
class ShardWriter:
  """Writes records round-robin over `num_shards` ArrayRecord files named after `prefix`."""

  prefix: str
  num_shards: int = 1
  # The shards this writer opens (None: all); `write_to` writes one of them (a multi-process
  # build: each process writes its own shards).
  shards: Any = None

  def __post_init__(self):
    # Imported here so that reading code does not need the writer extension loaded.
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    if self.num_shards < 1:
      raise ValueError(f"num_shards={self.num_shards} must be >= 1")
    os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
    self.paths = shard_paths(self.prefix, self.num_shards)
    opened = range(self.num_shards) if self.shards is None else self.shards
    self._writers = {i: ArrayRecordWriter(self.paths[i], WRITER_OPTIONS) for i in opened}
    self.count = 0

  def write(self, example: dict[str, Any]) -> None:
    self.write_to(self.count % self.num_shards, example)

  def write_to(self, shard: int, example: dict[str, Any]) -> None:
    self._writers[shard].write(encode_record(example))
    self.count += 1

  def close(self) -> None:
    for w in self._writers.values():
      w.close()

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
