"""Random-access sources behind one interface, named by the config (`data.corpora.NAME.source`).

    embedded      the default corpus (embedded.py), built on first use; name = one of its parts
                  (paired|image|text for pretraining; retrieval|text_pairs|vqa|ve held out)
    array_record  our own shards (records.py; written by `python -m flava_jax.data.build`):
                  `paths` names shard files, globs or folders (comma-separated). A folder means
                  the shards of the reader's kind (see folder_shards): the builder names shards
                  after their kind (KIND-00000-of-00004.array_record, or --prefix with the kind in
                  PREFIX.summary.json), so paired, image and text builds can share one folder.
    tfds          a prepared TFDS dataset read through tfds.data_source (ArrayRecord files);
                  images are kept encoded (decoded later by the pipeline's workers)

Every source returns canonical examples: {"image", "caption", "text", "label", "text_pair",
"answers"} with the configured field of the underlying record under each canonical name (`fields`,
nested TFDS features as "captions/text"; e.g. fields={"text": "question", "answers": "answers"} for
VQA). A record that cannot be read or parsed comes back as {"_skip": reason} so that
the pipeline counts it instead of dying. Problems with the whole source (missing dataset, empty
source, a field name that no record has) are errors at start-up that name the config field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from flava_jax.data import embedded, records
from flava_jax.data.examples import Skip
from flava_jax.parse import check_choice

# text_pair: a sentence pair's second text; answers: a question's annotators' answers.
CANONICAL_FIELDS = ("image", "caption", "text", "label", "text_pair", "answers", "audio")
# What each corpus kind needs from its source (label is optional for image corpora). audio:
# speech (or other sound) with its caption or transcript; trimodal: an image, its caption and
# the audio of it (the spoken embedded corpus).
REQUIRED_FIELDS = {"paired": ("image", "caption"), "image": ("image",), "text": ("text",),
                   "audio": ("audio", "caption"), "trimodal": ("image", "caption", "audio")}
SOURCE_KINDS = ("embedded", "array_record", "tfds")
# The canonical fields the builder's records of each kind hold (flava_jax/data/build.py): which
# kind of shards a reader that needs some fields takes from a folder (kind_for_fields).
BUILT_FIELDS = {"paired": ("image", "caption"), "image": ("image", "label"), "text": ("text",),
                "audio": ("audio", "caption"), "trimodal": ("image", "caption", "audio")}
_PROBE_RECORDS = 32  # records read at start-up to check the field names


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  source: str = "embedded"
  name: str = ""  # embedded: one of embedded.PARTS; tfds: the dataset name (e.g. coco_captions)
  split: str = "train"
  paths: str = ""  # array_record: a directory, glob or comma-separated list of shard files
  data_dir: str = ""  # tfds: where the prepared dataset lives (default: TFDS's own default)
  cache_dir: str = ""  # embedded: where it is built (default ~/.cache/flava_jax or $FLAVA_JAX_CACHE)
  # canonical field -> field of the source's records ("" drops it)
  fields: dict = dataclasses.field(default_factory=lambda: {k: k for k in CANONICAL_FIELDS})

  def __post_init__(self):
    check_choice("source", self.source, SOURCE_KINDS)
    unknown = set(self.fields) - set(CANONICAL_FIELDS)
    if unknown:
      raise ValueError(f"fields has unknown canonical names {sorted(unknown)}; "
                       f"use {CANONICAL_FIELDS}")


# records.shard_paths' names: PREFIX-00000-of-00004.array_record
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-\d{5}-of-\d{5}" + re.escape(records.SHARD_SUFFIX)
                         + "$")


def kind_for_fields(needed: Sequence[str]) -> str | None:
  """The builder kind whose records hold every canonical field in `needed` and nothing another
  such kind lacks (image + caption: paired, not trimodal), else None (no kind, or several that
  fit as well: image alone is in paired and image shards)."""
  kinds = [k for k, fields in BUILT_FIELDS.items() if set(needed) <= set(fields)]
  least = [k for k in kinds if all(set(BUILT_FIELDS[k]) <= set(BUILT_FIELDS[o]) for o in kinds)]
  return least[0] if len(least) == 1 else None


def shard_kind(directory: str, prefix: str) -> str | None:
  """The kind of the shards `directory/PREFIX-*`: the builder's PREFIX.summary.json says it;
  without one, a prefix that is a kind's name is that kind; otherwise None (not recognised)."""
  summary = os.path.join(directory, f"{prefix}.summary.json")
  if os.path.isfile(summary):
    try:
      with open(summary, encoding="utf-8") as f:
        kind = json.load(f).get("kind")
      if kind in REQUIRED_FIELDS:
        return kind
    except (OSError, ValueError, AttributeError):
      pass  # an unreadable summary: judge by the name
  return prefix if prefix in REQUIRED_FIELDS else None


def folder_kinds(directory: str) -> dict[str, list[str]]:
  """A folder's shards grouped by kind: {kind: paths}, then shards of no recognised kind grouped
  under "?PREFIX" (their file name prefix). Paths sorted."""
  groups: dict[str, list[str]] = {}
  for path in records.find_shards(directory):
    name = os.path.basename(path)
    match = _SHARD_NAME.match(name)
    prefix = match.group("prefix") if match else name.split(records.SHARD_SUFFIX)[0]
    kind = shard_kind(directory, prefix)
    groups.setdefault(kind if kind else f"?{prefix}", []).append(path)
  return {k: sorted(groups[k]) for k in sorted(groups, key=lambda k: (k.startswith("?"), k))}


def _describe_groups(groups: dict[str, list[str]]) -> str:
  parts = []
  for label, paths in groups.items():
    n = f"{len(paths)} file{'s' if len(paths) != 1 else ''}"
    parts.append(f"{label} shards ({n})" if not label.startswith("?") else
                 f"shards of no recognisable kind {label[1:]}-* ({n})")
  return ", ".join(parts)


def folder_shards(directory: str, kind: str | None, field: str) -> list[str]:
  """The shards of `directory` that a reader of `kind` takes ("paired", "image", "text"; None:
  a reader no builder kind fits, e.g. VQA). `field` names the config field in messages.

    - the folder holds shards of `kind`: those (other kinds are other corpora's; shards of no
      recognisable kind left out are logged as a warning);
    - it holds one set of shards only, of no recognisable kind (files written by hand, with a
      prefix of their own), or `kind` is None and it holds one set of any kind: that set (the
      source's field checks judge whether they fit);
    - otherwise (several kinds and none of `kind`, or only another kind): a ValueError naming
      the kinds found and the folder. Name the files or a glob to read other shards.
  """
  groups = folder_kinds(directory)
  if not groups:
    return []
  if kind is not None and kind in groups:
    others = {k: v for k, v in groups.items() if k != kind}
    unknown = {k: v for k, v in others.items() if k.startswith("?")}
    if others:  # other kinds are other corpora's; shards of no known kind may be data lost
      (logging.warning if unknown else logging.info)(
          "%s=%r: reading its %d %s shard(s), leaving out %s", field, directory,
          len(groups[kind]), kind, _describe_groups(others))
    return groups[kind]
  if len(groups) == 1:
    (label,) = groups
    if kind is None or label.startswith("?"):
      return groups[label]
  pattern = os.path.join(directory, f"{kind or 'PREFIX'}-*{records.SHARD_SUFFIX}")
  found = _describe_groups(groups)
  problem = (f"the folder holds {found} and no {kind} shards" if kind else
             f"the folder holds {found}, and this split reads one set of them")
  raise ValueError(f"{field}={directory!r}: {problem}; name the shards to read (a glob such as "
                   f"{pattern!r}) or a folder holding only them")


def resolve_paths(spec: str, kind: str | None, field: str) -> list[str]:
  """Shard paths of an array_record `paths` value: comma-separated files, globs and folders
  (a folder: its shards of `kind`, see folder_shards). Sorted, unique."""
  paths = []
  for entry in spec.split(","):
    entry = os.path.expanduser(entry.strip())
    if not entry:
      continue
    if os.path.isdir(entry):
      paths += folder_shards(entry, kind, field)
    else:
      paths += records.find_shards(entry)
  return sorted(set(paths))


def _lookup(record: Any, path: str) -> Any:
  """record["a"]["b"] for path "a/b"; KeyError when absent."""
  value = record
  for key in path.split("/"):
    if not isinstance(value, dict) or key not in value:
      raise KeyError(path)
    value = value[key]
  return value


class Source:
  """len() and [i] -> canonical example dict; picklable for grain's worker processes."""

  def __init__(self, cfg: SourceConfig, where: str):
    self.cfg = cfg
    self.where = where  # the config path, for messages
    self._fields = {k: v for k, v in cfg.fields.items() if v}

  def __len__(self) -> int:
    raise NotImplementedError

  def _raw(self, index: int) -> Any:
    raise NotImplementedError

  def _parse(self, raw: Any) -> dict:
    return raw

  def record(self, index: int) -> dict:
    """The underlying record as a dict (raises on failure)."""
    return self._parse(self._raw(index))

  def __getitem__(self, index: int) -> dict:
    try:
      raw = self._raw(index)
    except Exception as e:  # pylint: disable=broad-except  (storage layers raise many types)
      logging.warning("%s: record %d unreadable: %s", self.where, index, e)
      return {"_skip": "unreadable_record"}
    try:
      record = self._parse(raw)
    except (ValueError, Skip) as e:
      return {"_skip": getattr(e, "reason", "corrupt_record")}
    out = {}
    for name, path in self._fields.items():
      try:
        out[name] = _lookup(record, path)
      except KeyError:
        pass
    return out

  def check(self, kind: str) -> None:
    """Start-up checks for a corpus of `kind` (REQUIRED_FIELDS): see check_fields."""
    self.check_fields(REQUIRED_FIELDS[kind], f"a {kind} corpus")

  def check_fields(self, needed: tuple[str, ...], what: str) -> None:
    """Start-up checks: not empty, and every canonical field in `needed` mapped and found in some
    early record; `what` names the user in messages ("a paired corpus", "the VQA evaluation")."""
    unknown = sorted(set(needed) - set(CANONICAL_FIELDS))
    if unknown:
      raise ValueError(f"{what} needs unknown canonical fields {unknown}; use {CANONICAL_FIELDS}")
    n = len(self)
    if n == 0:
      raise ValueError(f"{self.where}: the source is empty ({self.describe()})")
    for name in needed:
      if not self._fields.get(name):
        raise ValueError(f"{self.where}.fields.{name} is empty, but {what} needs it")
    found, keys = set(), set()
    for i in range(min(n, _PROBE_RECORDS)):
      try:
        record = self.record(i)
      except Exception:  # pylint: disable=broad-except  (bad records are counted later)
        continue
      keys |= set(_flat_keys(record))
      for name in needed:
        try:
          _lookup(record, self._fields[name])
          found.add(name)
        except KeyError:
          pass
    for name in needed:
      if name not in found:
        raise ValueError(
            f"{self.where}.fields.{name}={self._fields[name]!r}: no such field in the first "
            f"{min(n, _PROBE_RECORDS)} records of {self.describe()}; their fields: "
            f"{sorted(keys)}")

  def describe(self) -> str:
    raise NotImplementedError


def _flat_keys(record: Any, prefix: str = "") -> list[str]:
  """Field paths of a (nested) record, as `fields` names them: "captions/text"."""
  if not isinstance(record, dict):
    return []
  out = []
  for k, v in record.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    out += _flat_keys(v, path) if isinstance(v, dict) else [path]
  return out


class ArrayRecordSource(Source):
  """Our own shards: msgpack records (records.py). `kind`: what the reader is (a corpus kind, or
  None), deciding which shards of a folder it reads (folder_shards)."""

  def __init__(self, cfg: SourceConfig, where: str, paths: list[str] | None = None,
               kind: str | None = None):
    super().__init__(cfg, where)
    if paths is None:
      if not cfg.paths:
        raise ValueError(f"{where}.paths is empty: name the shard files, a glob or a directory")
      paths = resolve_paths(cfg.paths, kind, f"{where}.paths")
      if not paths:
        raise ValueError(f"{where}.paths={cfg.paths!r} matches no ArrayRecord shard")
    self.paths = paths
    self._open()

  def _open(self):
    import grain  # pylint: disable=g-import-not-at-top
    self._data = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._data)

  def _raw(self, index: int) -> bytes:
    return self._data[index]

  def _parse(self, raw: bytes) -> dict:
    try:
      return records.decode_record(raw)
    except ValueError as e:
      raise Skip("corrupt_record", str(e)) from e

  def describe(self) -> str:
    return f"{len(self.paths)} ArrayRecord shard(s) starting {self.paths[0]}"

  def __getstate__(self):
    return {"cfg": self.cfg, "where": self.where, "paths": self.paths}

  def __setstate__(self, state):
    self.__init__(state["cfg"], state["where"], state["paths"])


class EmbeddedSource(ArrayRecordSource):
  """The default corpus, built and cached on first use."""

  def __init__(self, cfg: SourceConfig, where: str, paths: list[str] | None = None):
    if paths is None:
      if cfg.name not in embedded.PARTS:
        raise ValueError(f"{where}.name={cfg.name!r}: the embedded corpus has parts "
                         f"{embedded.PARTS}")
      available = embedded.splits(cfg.name)
      if cfg.split not in available:
        raise ValueError(f"{where}.split={cfg.split!r}: the embedded corpus's {cfg.name} part has "
                         f"splits {available}")
      paths = records.find_shards(embedded.shard_pattern(cfg.name, cfg.split, cfg.cache_dir))
    super().__init__(cfg, where, paths)

  def describe(self) -> str:
    return f"embedded corpus {self.cfg.name}/{self.cfg.split}"


class TfdsSource(Source):
  """A prepared TFDS dataset (ArrayRecord file format) through tfds.data_source."""

  def __init__(self, cfg: SourceConfig, where: str):
    super().__init__(cfg, where)
    if not cfg.name:
      raise ValueError(f"{where}.name is empty: name the TFDS dataset (e.g. coco_captions)")
    self._open()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    cfg = self.cfg
    decoders = {}
    image_path = self._fields.get("image")
    if image_path:  # keep images encoded: decoding happens in the pipeline's workers
      node = decoders
      keys = image_path.split("/")
      for key in keys[:-1]:
        node = node.setdefault(key, {})
      node[keys[-1]] = tfds.decode.SkipDecoding()
    try:
      self._data = tfds.data_source(cfg.name, split=cfg.split, data_dir=cfg.data_dir or None,
                                    download=False, decoders=decoders or None)
    except Exception as e:  # pylint: disable=broad-except  (tfds raises many types)
      raise ValueError(
          f"{self.where}: TFDS dataset {cfg.name!r} split {cfg.split!r} cannot be opened from "
          f"data_dir={cfg.data_dir or '(TFDS default)'}: {type(e).__name__}: {e}. Prepare it "
          "first (tfds build --file_format=array_record) and set data_dir.") from e

  def __len__(self) -> int:
    return len(self._data)

  def _raw(self, index: int) -> dict:
    return self._data[index]

  def describe(self) -> str:
    return f"TFDS {self.cfg.name}/{self.cfg.split}"

  def __getstate__(self):
    return {"cfg": self.cfg, "where": self.where}

  def __setstate__(self, state):
    self.__init__(state["cfg"], state["where"])


SOURCES = {"embedded": EmbeddedSource, "array_record": ArrayRecordSource, "tfds": TfdsSource}


def open_source(cfg: SourceConfig, where: str, kind: str | None = None) -> Source:
  """Opens the source the config names; `where` is its config path (for error messages).

  `kind` ("paired", "image", "text", or None when no builder kind fits the reader) picks the
  shards an array_record folder contributes (folder_shards); other sources ignore it.
  """
  if cfg.source == "array_record":
    return ArrayRecordSource(cfg, where, kind=kind)
  return SOURCES[cfg.source](cfg, where)
