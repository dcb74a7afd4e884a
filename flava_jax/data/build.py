"""Builds flava_jax ArrayRecord shards (flava_jax.data.records) from plain files.

    python -m flava_jax.data.build --kind=paired --input=captions.jsonl --out=DIR --num_shards=8
    python -m flava_jax.data.build --kind=image --input=train/ --out=DIR      # class sub-folders
    python -m flava_jax.data.build --kind=text --input=books/,wiki.jsonl --out=DIR
    python -m flava_jax.data.build --kind=audio --input=speech.csv --out=DIR --num_shards=8
    python -m flava_jax.data.build --kind=trimodal --input=spoken.jsonl --out=DIR

What --input may be (several --input flags or comma-separated paths; globs are expanded):

    paired  captions JSONL (.jsonl/.ndjson: one object per line with --image_field and
            --caption_field; relative image paths are resolved against the captions file's
            folder), CSV/TSV (.csv/.tsv with a header row naming the same fields), WebDataset
            tars (.tar: members grouped by key, one image member plus a .txt caption or a .json
            holding --caption_field), or a folder holding such files.
    image   an image folder: with class sub-folders every sub-folder is a class (label = index
            of its name in sorted order, names written to PREFIX.classes.json); without them the
            images have no label. Or WebDataset tars (images only, no labels).
    text    .txt files (or folders of them): blank-line separated paragraphs are joined into
            examples of about --text_chars characters (longer paragraphs and lines are split
            into such chunks, at sentence ends or between words); or JSONL with a --text_field,
            one example per document, a document longer than --text_chars split into chunks.
    audio   as paired, with rows naming an audio file (--audio_field: WAV, FLAC, OGG, MP3, ...)
            and its caption or transcript (--caption_field); WebDataset tars hold an audio
            member (.wav/.flac/.ogg/.mp3) plus a .txt or .json caption.
    trimodal
            as audio, each row (or tar sample) also naming an image (--image_field): an image,
            its caption and the caption's audio.

Records: paired -> {image, caption, id}, image -> {image, label?, id}, text -> {text, id},
audio -> {audio, caption, id}, trimodal -> {image, caption, audio, id}; `id` says where the
example came from. Every image is decoded once to check it, but the original file bytes are
stored unchanged. Every audio file is decoded once too (flava_jax.data.audio.decode_audio, at
most --max_audio_seconds long): one that needs no repair is stored as the original bytes; one
that was repaired (resampled to 16 kHz, downmixed to mono, a WAV whose data ends before its
header says) is stored as the repaired wave, re-encoded as 16 kHz mono FLAC (PCM_16), so that
readers get what was checked. Examples that cannot be used are skipped and counted by reason
(flava_jax.data.examples.SKIP_REASONS), repaired ones counted by repair; the summary printed at
the end, and written to DIR/PREFIX.summary.json last (so its presence means the build
finished), says what was written, what was repaired and what was skipped and why. Examples are
written in a deterministic order (inputs as given, files in sorted order) round-robin over the
shards. A command that cannot work (a missing input, an unknown format, an input that does not
fit --kind, an --out that cannot be written, nothing written) is an error that names the
problem, and leaves no shards behind. A build is written into a hidden folder inside --out and
moved into place when it has finished, so with --overwrite the old shards are replaced only by a
finished build.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import glob
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import jax
import numpy as np

from flava_jax import multihost
from flava_jax.data.audio import SAMPLE_RATE, decode_audio
from flava_jax.data.examples import Skip, as_image_bytes, as_text
from flava_jax.data.preprocess import KINDS
from flava_jax.data.records import SHARD_SUFFIX, ShardWriter
from flava_jax.data.transforms import ImageTransformConfig, decode_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")
CAPTION_EXTENSIONS = ("jsonl", "ndjson", "csv", "tsv")
TAR_EXTENSIONS = ("tar", "tar.gz", "tgz")
TEXT_EXTENSIONS = ("txt",)
JSONL_EXTENSIONS = ("jsonl", "ndjson")

DEFAULT_MAX_PIXELS = ImageTransformConfig.max_pixels
DEFAULT_MAX_TEXT_BYTES = 65536
DEFAULT_TEXT_CHARS = 2000
DEFAULT_MAX_AUDIO_SECONDS = 600.0
# The kinds whose examples hold audio, and those whose sources are captions files or tars.
AUDIO_KINDS = ("audio", "trimodal")
CAPTION_KINDS = ("paired",) + AUDIO_KINDS
# Ids of skipped examples kept per reason, so that a summary can point at real cases.
SKIP_EXAMPLES_KEPT = 5

# A source yields (id, fields); a field value may be a zero-argument callable that reads it
# lazily and may raise Skip. A Skip in place of the fields dict counts an example that could not
# even be parsed.
Fields = dict[str, Any]
Item = tuple[str, "Fields | Skip"]


class BuildError(ValueError):
  """The command as a whole cannot work: a missing input, an unknown format, nothing written."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
  image_field: str = "image"
  caption_field: str = "caption"
  text_field: str = "text"
  text_chars: int = DEFAULT_TEXT_CHARS
  audio_field: str = "audio"
  max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS


@dataclasses.dataclass
class Summary:
  """What a build wrote and skipped; `format()` is the printed report, `to_dict()` the JSON."""

  kind: str
  out_dir: str
  prefix: str
  inputs: list[str] = dataclasses.field(default_factory=list)
  written: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  paths: list[str] = dataclasses.field(default_factory=list)
  classes: list[str] | None = None
  # Files that are not data of this kind (a README in an image folder), counted by what they are.
  ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skip_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  # Examples written after a repair (audio: resampled, downmixed, truncated), counted by repair
  # (an example may have several); repaired_total counts the examples.
  repaired: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  repair_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  repaired_total: int = 0
  options: BuildOptions = dataclasses.field(default_factory=BuildOptions)

  def skip(self, reason: str, example_id: str) -> None:
    self.skipped[reason] += 1
    kept = self.skip_examples.setdefault(reason, [])
    if len(kept) < SKIP_EXAMPLES_KEPT:
      kept.append(example_id)

  def repair(self, repairs: Sequence[str], example_id: str) -> None:
    """Counts a written example that needed `repairs` (none: nothing is counted)."""
    if not repairs:
      return
    self.repaired_total += 1
    for name in repairs:
      self.repaired[name] += 1
      kept = self.repair_examples.setdefault(name, [])
      if len(kept) < SKIP_EXAMPLES_KEPT:
        kept.append(example_id)

  @property
  def summary_path(self) -> str:
    return os.path.join(self.out_dir, f"{self.prefix}.summary.json")

  @property
  def classes_path(self) -> str:
    return os.path.join(self.out_dir, f"{self.prefix}.classes.json")

  def format(self) -> str:
    shards = len(self.paths)
    lines = [f"wrote {self.written} {self.kind} examples to {shards} shard"
             f"{'s' if shards != 1 else ''} in {self.out_dir} "
             f"({self.prefix}-*-of-{shards:05d}{SHARD_SUFFIX})"]
    if self.classes is not None:
      names = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
      lines.append(f"  {len(self.classes)} classes ({names}) in {self.classes_path}")
    if 0 < self.written < shards:
      lines.append(f"  {shards - self.written} of the shards are empty (fewer examples than "
                   "shards)")
    return "\n".join(lines + self.format_repaired() + self.format_skipped())

  def format_repaired(self) -> list[str]:
    """`repaired 3 examples: resampled 2 (e.g. a.jsonl:4, a.jsonl:9), downmixed 1 (...)`, or
    nothing when no example needed a repair."""
    if not self.repaired_total:
      return []
    parts = []
    for name, count in sorted(self.repaired.items(), key=lambda kv: (-kv[1], kv[0])):
      shown = self.repair_examples.get(name, [])[:3]
      more = ", ..." if count > len(shown) else ""
      parts.append(f"{name} {count} (e.g. {', '.join(shown)}{more})")
    total = self.repaired_total
    return [f"repaired {total} example{'s' if total != 1 else ''}: {', '.join(parts)}"]

  def format_skipped(self) -> list[str]:
    total = sum(self.skipped.values())
    lines = [f"skipped {total} example{'s' if total != 1 else ''}" + (":" if total else "")]
    width = max((len(r) for r in self.skipped), default=0)
    for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
      shown = self.skip_examples.get(reason, [])[:3]
      more = ", ..." if count > len(shown) else ""
      lines.append(f"  {reason:<{width}}  {count:>7}   e.g. {', '.join(shown)}{more}")
    for what, count in sorted(self.ignored.items()):
      lines.append(f"ignored {count} {what.replace('_', ' ')}")
    return lines

  def to_dict(self) -> dict[str, Any]:
    return dict(kind=self.kind, written=self.written, skipped=dict(sorted(self.skipped.items())),
                skip_examples=dict(sorted(self.skip_examples.items())),
                repaired=dict(sorted(self.repaired.items())),
                repair_examples=dict(sorted(self.repair_examples.items())),
                repaired_total=self.repaired_total,
                shards=[os.path.basename(p) for p in self.paths], classes=self.classes,
                ignored=dict(sorted(self.ignored.items())), inputs=self.inputs,
                options=dataclasses.asdict(self.options))


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _extension(path: str) -> str:
  """'a/b.JPG' -> 'jpg'; 'x.tar.gz' -> 'tar.gz'; '' when there is none."""
  name = os.path.basename(path).lower()
  if name.endswith(".tar.gz"):
    return "tar.gz"
  return name.rpartition(".")[2] if "." in name else ""


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def _sorted_walk(root: str) -> Iterator[str]:
  """Every non-hidden file under `root`, in sorted order (directories sorted at every level)."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
    for name in sorted(filenames):
      if not _is_hidden(name):
        yield os.path.join(dirpath, name)


def _read_file(path: str, what: str = "image") -> bytes:
  """The bytes of a file a row names; a missing one is Skip(missing_WHAT), WHAT image or
  audio."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise Skip(f"missing_{what}", path) from None
  except OSError as e:
    raise Skip("unreadable_record", f"{path}: {e}") from None


def _decode_utf8(raw: bytes) -> str:
  """Strict UTF-8, else surrogate escapes that _text_value turns back into the original bytes."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("utf-8", "surrogateescape")


def _text_value(value: Any) -> Any:
  """A str holding surrogate escapes (bad bytes) -> those bytes, so as_text judges them."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      try:
        return value.encode("utf-8", "surrogateescape")
      except UnicodeEncodeError:  # surrogates that did not come from bad bytes ("\ud800" in JSON)
        return value.encode("utf-8", "replace")
  return value


def _parse_json_object(raw: bytes) -> dict[str, Any]:
  try:
    obj = json.loads(_decode_utf8(raw))
  except ValueError as e:
    raise Skip("corrupt_record", f"not JSON: {e}") from None
  if not isinstance(obj, dict):
    raise Skip("corrupt_record", f"a JSON {type(obj).__name__}, not an object")
  return obj


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, bytes) of every non-blank line; a UTF-8 byte order mark is dropped."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if number == 1:
        line = line.removeprefix(b"\xef\xbb\xbf")
      if line.strip():
        yield number, line


# ---------------------------------------------------------------------------------------------
# Sources: each yields (id, fields) items in a deterministic order.


def _image_folder_items(root: str, label: int | None, summary: Summary,
                        id_root: str) -> Iterator[Item]:
  for path in _sorted_walk(root):
    if _extension(path) not in IMAGE_EXTENSIONS:
      summary.ignored["non_image_files"] += 1
      continue
    fields: Fields = {"image": functools.partial(_read_file, path)}
    if label is not None:
      fields["label"] = label
    yield os.path.relpath(path, id_root), fields


def _captions_jsonl_items(path: str, kind: str, opts: BuildOptions) -> Iterator[Item]:
  base, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
  for number, line in _jsonl_lines(path):
    item_id = f"{name}:{number}"
    try:
      obj = _parse_json_object(line)
    except Skip as e:
      yield item_id, e
      continue
    yield item_id, _row_fields(kind, obj, opts, base)


def _row_columns(kind: str, opts: BuildOptions) -> dict[str, str]:
  """{field: the column (JSON key) of a captions row that holds it} for a captions `kind`."""
  columns = {"image": opts.image_field} if kind in ("paired", "trimodal") else {}
  columns["caption"] = opts.caption_field
  if kind in AUDIO_KINDS:
    columns["audio"] = opts.audio_field
  return columns


def _file_field(value: Any, base: str, what: str) -> Any:
  """A row's file path (relative to `base`) -> a reader of the file, or None (absent, empty or
  not a path: missing_WHAT)."""
  if isinstance(value, str) and value.strip():
    path = os.path.join(base, os.path.expanduser(value.strip()))
    return functools.partial(_read_file, path, what)
  return None


def _row_fields(kind: str, row: dict[str, Any], opts: BuildOptions, base: str) -> Fields:
  """Fields of a caption row; images and audio are read (lazily) from paths relative to
  `base`."""
  return {field: row.get(column) if field == "caption" else
          _file_field(row.get(column), base, field)
          for field, column in _row_columns(kind, opts).items()}


def _captions_csv_items(path: str, kind: str, opts: BuildOptions) -> Iterator[Item]:
  base, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
  delimiter = "\t" if _extension(path) == "tsv" else ","
  with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    try:
      columns = reader.fieldnames
    except csv.Error as e:
      raise BuildError(f"{path}: the header row does not parse: {e}") from None
    if columns is None:  # an empty file
      return
    wanted = _row_columns(kind, opts)
    missing = [c for c in wanted.values() if c not in columns]
    if missing:
      raise BuildError(
          f"{path} has no column {', '.join(map(repr, missing))} (its columns: "
          f"{', '.join(map(repr, columns))}); name them with "
          + "/".join(f"--{field}_field" for field in wanted))
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield f"{name}:{reader.line_num}", Skip("corrupt_record", str(e))
        continue
      yield f"{name}:{reader.line_num}", _row_fields(kind, row, opts, base)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
  try:
    f = tar.extractfile(member)
    assert f is not None  # only regular files are grouped
    return f.read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise Skip("unreadable_record", f"{member.name}: {e}") from None


def _member_caption(tar: tarfile.TarFile, member: tarfile.TarInfo, field: str) -> Any:
  return _parse_json_object(_read_member(tar, member)).get(field)


def _member_field(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo],
                  extensions: Sequence[str]) -> Any:
  """A reader of a sample's first member with one of `extensions`, or None (missing)."""
  member = next((m for ext, m in members.items() if ext in extensions), None)
  return None if member is None else functools.partial(_read_member, tar, member)


def _tar_items(path: str, kind: str, opts: BuildOptions) -> Iterator[Item]:
  """WebDataset samples: members grouped by key (folder + file name up to its first dot)."""
  name = os.path.basename(path)
  try:
    tar = tarfile.open(path)
  except (tarfile.TarError, OSError) as e:
    raise BuildError(f"{path} is not a readable tar file: {e}") from None
  with tar:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    broken: Exception | None = None
    try:
      for member in tar:
        directory, base = posixpath.split(member.name)
        stem, dot, extension = base.partition(".")
        if member.isfile() and dot and not _is_hidden(base):
          samples.setdefault(posixpath.join(directory, stem), {}).setdefault(
              extension.lower(), member)
    except (tarfile.TarError, OSError, EOFError) as e:  # truncated: keep what was listed
      broken = e
    for key, members in samples.items():
      fields: Fields = {}
      if kind != "audio":
        fields["image"] = _member_field(tar, members, IMAGE_EXTENSIONS)
      if kind in AUDIO_KINDS:
        fields["audio"] = _member_field(tar, members, AUDIO_EXTENSIONS)
      if kind in CAPTION_KINDS:
        if "txt" in members:
          fields["caption"] = functools.partial(_read_member, tar, members["txt"])
        elif "json" in members:
          fields["caption"] = functools.partial(_member_caption, tar, members["json"],
                                                opts.caption_field)
        else:
          fields["caption"] = None
      yield f"{name}/{key}", fields
    if broken is not None:
      logging.warning("%s is damaged after %d samples: %s", path, len(samples), broken)
      yield f"{name}/<after {len(samples)} samples>", Skip("unreadable_record", str(broken))


def _paragraphs(f: BinaryIO) -> Iterator[list[str]]:
  """Blank-line separated paragraphs of a text file, each as its list of lines."""
  def lines() -> Iterator[str]:
    for number, raw in enumerate(f):
      if number == 0:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
      yield _decode_utf8(raw)
  return _paragraphs_of(lines())


def _paragraphs_of(lines: Iterable[str]) -> Iterator[list[str]]:
  """Blank-line separated paragraphs of `lines` (line ends are dropped)."""
  paragraph: list[str] = []
  for line in lines:
    line = line.rstrip("\r\n")
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      yield paragraph
      paragraph = []
  if paragraph:
    yield paragraph


# A sentence ends with . ! ? (or an ellipsis), perhaps closing quotes or brackets, then white
# space; CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+\s*")
_WHITE_SPACE = re.compile(r"\s+")


def _cut(window: str, min_cut: int) -> int:
  """Where to end a piece taken from `window`: after its last sentence end at or beyond
  `min_cut`, else after its last white space there, else at its end (a word longer than half
  a chunk: a URL, a base64 blob, text without spaces)."""
  for pattern in (_SENTENCE_END, _WHITE_SPACE):
    ends = [m.end() for m in pattern.finditer(window, min_cut)]
    if ends:
      return ends[-1]
  return len(window)


def split_text(text: str, max_chars: int) -> list[str]:
  """`text` in pieces of at most `max_chars` characters, cut at sentence ends where possible,
  else between words; the pieces joined again are exactly `text` (nothing is lost)."""
  pieces = []
  start = 0
  while len(text) - start > max_chars:
    cut = _cut(text[start:start + max_chars], max_chars // 2)
    pieces.append(text[start:start + cut])
    start += cut
  pieces.append(text[start:])
  return pieces


def text_chunks(paragraphs: Iterable[list[str]], target_chars: int) -> Iterator[str]:
  """Joins paragraphs until a chunk holds about `target_chars` characters.

  Short paragraphs (headings, one-liners) would make poor examples on their own; a paragraph
  longer than the target is split at its line breaks, and a line longer than the target (a
  file or document without line breaks) at sentence ends or between words (split_text), so
  that chunks stay near the target. No text is dropped.
  """
  parts: list[str] = []
  size = 0
  for lines in paragraphs:
    paragraph = "\n".join(lines)
    units = lines if len(paragraph) > target_chars else [paragraph]
    for unit in units:
      for i, piece in enumerate(split_text(unit, target_chars)):
        if parts and i == 0:  # pieces of one line carry their own white space
          parts.append("\n\n")
        parts.append(piece)
        size += len(piece)
        if size >= target_chars:
          yield from _nonblank("".join(parts))
          parts, size = [], 0
  yield from _nonblank("".join(parts))


def _nonblank(chunk: str) -> Iterator[str]:
  chunk = chunk.strip()
  if chunk:  # a chunk cut out of a long run of spaces
    yield chunk


def _text_file_items(path: str, opts: BuildOptions, id_root: str) -> Iterator[Item]:
  with open(path, "rb") as f:
    for i, chunk in enumerate(text_chunks(_paragraphs(f), opts.text_chars)):
      yield f"{os.path.relpath(path, id_root)}#{i}", {"text": chunk}


def _text_jsonl_items(path: str, opts: BuildOptions, id_root: str) -> Iterator[Item]:
  """One example per document; a document longer than --text_chars is split into chunks of
  about that length (ids `FILE:LINE#i`), like the paragraphs of a .txt file."""
  name = os.path.relpath(path, id_root)
  for number, line in _jsonl_lines(path):
    try:
      text = _parse_json_object(line).get(opts.text_field)
    except Skip as e:
      yield f"{name}:{number}", e
      continue
    if isinstance(text, str) and len(text) > opts.text_chars:
      chunks = list(text_chunks(_paragraphs_of(text.split("\n")), opts.text_chars))
      if len(chunks) > 1:
        for i, chunk in enumerate(chunks):
          yield f"{name}:{number}#{i}", {"text": chunk}
        continue
    yield f"{name}:{number}", {"text": text}


# ---------------------------------------------------------------------------------------------
# Planning: which source reads each input. Every whole-command error is raised here, before a
# shard is opened.

Source = Callable[[], Iterator[Item]]


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
  """--input values -> existing paths: comma-separated lists split, ~ and globs expanded."""
  values = [inputs] if isinstance(inputs, str) else list(inputs)
  paths: list[str] = []
  for value in values:
    for part in value.split(","):
      part = os.path.expanduser(part.strip())
      if not part:
        continue
      if os.path.exists(part):
        paths.append(part)
      elif glob.has_magic(part) and glob.glob(part):
        paths += sorted(glob.glob(part))
      else:
        raise BuildError(f"input path does not exist: {part}")
  if not paths:
    raise BuildError("no input given (--input=PATH)")
  return paths


def _wrong_kind(path: str, kind: str) -> BuildError:
  """An error for an input of a recognised format that belongs to another --kind."""
  extension = _extension(path)
  if os.path.isdir(path):
    what = "a folder"
  elif extension in IMAGE_EXTENSIONS:
    what = "an image file"
  elif extension in AUDIO_EXTENSIONS:
    what = "an audio file (a captions file names those)"
  elif extension in TEXT_EXTENSIONS:
    what = "a text file (--kind=text)"
  elif extension in ("csv", "tsv"):
    what = "a captions table (--kind=paired, audio or trimodal)"
  elif extension in TAR_EXTENSIONS:
    what = "a tar of WebDataset samples (--kind=paired, image, audio or trimodal)"
  elif extension in JSONL_EXTENSIONS:
    what = "a JSONL file (--kind=paired, text, audio or trimodal)"
  else:
    what = f"a file of unknown format ({'.' + extension if extension else 'no extension'})"
  accepted = {"paired": "a captions .jsonl/.csv/.tsv, WebDataset .tar shards or a folder of them",
              "image": "an image folder or WebDataset .tar shards",
              "text": ".txt or .jsonl files or a folder of them",
              "audio": "a captions .jsonl/.csv/.tsv naming audio files, WebDataset .tar shards "
                       "or a folder of them",
              "trimodal": "a captions .jsonl/.csv/.tsv naming image and audio files, WebDataset "
                          ".tar shards or a folder of them"}[kind]
  return BuildError(f"--kind={kind} cannot read {path}: it is {what}; --kind={kind} takes "
                    f"{accepted}")


def _captions_sources(path: str, kind: str, opts: BuildOptions) -> list[Source]:
  """Sources of a --kind=paired, audio or trimodal input: captions files, tars, a folder."""
  if os.path.isdir(path):
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if not _is_hidden(n)]
    files = [f for f in files if os.path.isfile(f)
             and _extension(f) in CAPTION_EXTENSIONS + TAR_EXTENSIONS]
    if not files:
      hint = ("an image folder without captions is --kind=image" if kind == "paired" else
              "a folder of audio files needs a captions file naming them")
      raise BuildError(f"{path} holds no captions file (.jsonl/.csv/.tsv) or .tar shard for "
                       f"--kind={kind} ({hint})")
    return [s for f in files for s in _captions_sources(f, kind, opts)]
  extension = _extension(path)
  if extension in JSONL_EXTENSIONS:
    return [functools.partial(_captions_jsonl_items, path, kind, opts)]
  if extension in ("csv", "tsv"):
    return [functools.partial(_captions_csv_items, path, kind, opts)]
  if extension in TAR_EXTENSIONS:
    return [functools.partial(_tar_items, path, kind, opts)]
  raise _wrong_kind(path, kind)


def _class_names(path: str) -> list[str] | None:
  """Class sub-folder names of an image folder, or None for a flat one."""
  names = sorted(n for n in os.listdir(path)
                 if not _is_hidden(n) and os.path.isdir(os.path.join(path, n)))
  if not names:
    return None
  loose = [n for n in os.listdir(path) if _extension(n) in IMAGE_EXTENSIONS
           and os.path.isfile(os.path.join(path, n))]
  if loose:
    raise BuildError(f"{path} has class sub-folders ({', '.join(names[:5])}) and also "
                     f"{len(loose)} images outside them (e.g. {sorted(loose)[0]}); move those "
                     "into a class folder, or give the folders as separate flat inputs")
  return names


def _image_sources(paths: list[str], opts: BuildOptions, summary: Summary) -> list[Source]:
  """Sources of all --kind=image inputs; class names of every class folder are merged."""
  plans: list[tuple[str, str, list[str] | None]] = []  # (path, "folder"/"tar", classes)
  for path in paths:
    if os.path.isdir(path):
      names = _class_names(path)
      top = sorted(n for n in os.listdir(path) if not _is_hidden(n))
      if names is None and not any(_extension(n) in IMAGE_EXTENSIONS for n in top):
        tars = [os.path.join(path, n) for n in top if _extension(n) in TAR_EXTENSIONS]
        if not tars:
          raise BuildError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                           "class sub-folders or .tar shards")
        plans += [(t, "tar", None) for t in tars]
      else:
        plans.append((path, "folder", names))
    elif _extension(path) in TAR_EXTENSIONS:
      plans.append((path, "tar", None))
    else:
      raise _wrong_kind(path, "image")
  labelled = [p for p, _, names in plans if names is not None]
  if labelled and len(labelled) != len(plans):
    unlabelled = [p for p, _, names in plans if names is None]
    raise BuildError(f"some inputs have class sub-folders ({', '.join(labelled)}) and some have "
                     f"no labels ({', '.join(unlabelled)}); build them into separate prefixes")
  if labelled:
    summary.classes = sorted({n for _, _, names in plans for n in names or ()})
  sources: list[Source] = []
  for path, what, names in plans:
    if what == "tar":
      sources.append(functools.partial(_tar_items, path, "image", opts))
    elif names is None:
      sources.append(functools.partial(_image_folder_items, path, None, summary, path))
    else:
      assert summary.classes is not None
      sources += [functools.partial(_image_folder_items, os.path.join(path, n),
                                    summary.classes.index(n), summary, path) for n in names]
  return sources


def _text_sources(path: str, opts: BuildOptions, summary: Summary) -> list[Source]:
  if os.path.isdir(path):
    sources = []
    for file in _sorted_walk(path):
      extension = _extension(file)
      if extension in TEXT_EXTENSIONS:
        sources.append(functools.partial(_text_file_items, file, opts, path))
      elif extension in JSONL_EXTENSIONS:
        sources.append(functools.partial(_text_jsonl_items, file, opts, path))
      else:
        summary.ignored["non_text_files"] += 1
    if not sources:
      raise BuildError(f"{path} holds no .txt or .jsonl files for --kind=text")
    return sources
  base = os.path.dirname(path)
  if _extension(path) in TEXT_EXTENSIONS:
    return [functools.partial(_text_file_items, path, opts, base)]
  if _extension(path) in JSONL_EXTENSIONS:
    return [functools.partial(_text_jsonl_items, path, opts, base)]
  raise _wrong_kind(path, "text")


# ---------------------------------------------------------------------------------------------
# Checking and writing.


def _resolve(value: Any) -> Any:
  return value() if callable(value) else value


def _checked_image(value: Any, max_pixels: int) -> bytes:
  """The original bytes of an image that decodes within `max_pixels`, or Skip."""
  data = as_image_bytes(_resolve(value))
  decode_rgb(data, max_pixels)  # raises BadImage (a Skip); the decoded pixels are not kept
  return data


def _flac(wave: Any) -> bytes:
  """A float32 mono wave at SAMPLE_RATE -> FLAC bytes (PCM_16; samples clipped to [-1, 1])."""
  import soundfile  # pylint: disable=import-outside-toplevel
  out = io.BytesIO()
  soundfile.write(out, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
  return out.getvalue()


def _checked_audio(value: Any, max_seconds: float) -> tuple[bytes, list[str]]:
  """(bytes to store, repairs made) of an audio file that decodes, or Skip. Without repairs the
  original bytes; after one (resampled, downmixed, truncated) the repaired wave as 16 kHz mono
  FLAC, so that readers decode what was checked."""
  data = _resolve(value)
  wave, repairs = decode_audio(data, max_seconds=max_seconds)
  return (_flac(wave) if repairs else data), repairs


def make_record(kind: str, fields: Fields, opts: BuildOptions,
                repairs: list[str] | None = None) -> dict[str, Any]:
  """Source fields -> the record to write (without id), or Skip. Text is checked first: cheap,
  then images, then audio. Repairs made to the example are appended to `repairs`."""
  if kind == "paired":
    caption = as_text(_text_value(_resolve(fields.get("caption"))), opts.max_text_bytes)
    return {"image": _checked_image(fields.get("image"), opts.max_pixels), "caption": caption}
  if kind in AUDIO_KINDS:
    caption = as_text(_text_value(_resolve(fields.get("caption"))), opts.max_text_bytes)
    record: dict[str, Any] = {}
    if kind == "trimodal":
      record["image"] = _checked_image(fields.get("image"), opts.max_pixels)
    record["caption"] = caption
    record["audio"], made = _checked_audio(fields.get("audio"), opts.max_audio_seconds)
    if repairs is not None:
      repairs.extend(made)
    return record
  if kind == "image":
    record = {"image": _checked_image(fields.get("image"), opts.max_pixels)}
    if fields.get("label") is not None:
      record["label"] = int(fields["label"])
    return record
  return {"text": as_text(_text_value(_resolve(fields.get("text"))), opts.max_text_bytes)}


def _existing_outputs(prefix_path: str) -> list[str]:
  return sorted(glob.glob(glob.escape(prefix_path) + f"-*-of-*{SHARD_SUFFIX}")
                + [p for p in (f"{prefix_path}.summary.json", f"{prefix_path}.classes.json")
                   if os.path.exists(p)])


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, path)


def _make_out_dir(out_dir: str) -> list[str]:
  """Creates --out where missing; returns the folders created (deepest first), or BuildError."""
  if os.path.isdir(out_dir):
    return []
  if os.path.lexists(out_dir):
    raise BuildError(f"--out={out_dir} is a file, not a folder")
  created, folder = [], os.path.abspath(out_dir)
  while not os.path.lexists(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise BuildError(f"--out={out_dir} cannot be created: {folder} is a file, not a folder")
  try:
    os.makedirs(out_dir)
  except OSError as e:
    _remove_dirs(created)
    raise BuildError(f"--out={out_dir} cannot be created: {e.strerror or e}") from None
  return created


def _remove_dirs(folders: Iterable[str]) -> None:
  """Removes folders this build created (deepest first) while they are empty."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return


def _is_summary(path: str) -> bool:
  return path.endswith(".summary.json")


def _install(staging: str, out_dir: str, prefix: str, old: Sequence[str]) -> None:
  """Moves a finished build from `staging` into `out_dir`, replacing the `old` outputs.

  The old outputs are first moved aside (the summary first: a prefix without a summary is an
  unfinished build), then the new ones moved in (the summary last); on a failure everything is
  moved back, so the folder holds either the old build or the new one.
  """
  new = sorted(os.listdir(staging), key=lambda n: (_is_summary(n), n))
  backup = tempfile.mkdtemp(dir=out_dir, prefix=f".{prefix}.old-") if old else ""
  moved_aside: list[str] = []
  moved_in: list[str] = []
  try:
    for path in sorted(old, key=lambda p: (not _is_summary(p), p)):
      os.replace(path, os.path.join(backup, os.path.basename(path)))
      moved_aside.append(path)
    for name in new:
      os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
      moved_in.append(name)
  except OSError as e:
    for name in reversed(moved_in):
      _try_replace(os.path.join(out_dir, name), os.path.join(staging, name))
    for path in reversed(moved_aside):
      _try_replace(os.path.join(backup, os.path.basename(path)), path)
    if backup and not os.listdir(backup):
      os.rmdir(backup)
    raise BuildError(f"cannot move the new shards into --out={out_dir}: {e}; the old ones "
                     "are kept") from None
  if backup:
    shutil.rmtree(backup, ignore_errors=True)


def _try_replace(src: str, dst: str) -> None:
  try:
    os.replace(src, dst)
  except OSError as e:
    logging.error("could not move %s back to %s: %s", src, dst, e)


def _write_build(kind: str, sources: Sequence[Source], opts: BuildOptions, summary: Summary,
                 staging: str, num_shards: int, process_index: int = 0,
                 process_count: int = 1) -> None:
  """Writes this process's shards of the usable examples of `sources` under `staging`.

  Item j of the inputs (every item, in order, usable or not) belongs to shard j % num_shards;
  process p writes the shards s with s % process_count == p and reads (decodes, checks) only
  their items. So the shards are the same whatever the number of processes.
  """
  staging_prefix = os.path.join(staging, summary.prefix)
  mine = [s for s in range(num_shards) if s % process_count == process_index]
  try:
    writer = ShardWriter(staging_prefix, num_shards, shards=mine)
  except RuntimeError as e:  # ArrayRecordWriter cannot open a file
    raise BuildError(f"cannot write shards to --out={summary.out_dir}: {e}") from None
  index = -1
  try:
    with writer:
      for source in sources:
        for item_id, fields in source():
          index += 1
          shard = index % num_shards
          if shard % process_count != process_index:
            continue
          repairs: list[str] = []
          try:
            if isinstance(fields, Skip):
              raise fields
            record = make_record(kind, fields, opts, repairs)
          except Skip as e:
            summary.skip(e.reason, item_id)
            continue
          record["id"] = item_id
          writer.write_to(shard, record)
          summary.repair(repairs, item_id)
          if writer.count % 10000 == 0:
            logging.info("%s: %d examples written, %d skipped", summary.out_dir, writer.count,
                         sum(summary.skipped.values()))
  except RuntimeError as e:  # ArrayRecordWriter: a full disk, a vanished folder
    raise BuildError(f"writing shards to --out={summary.out_dir} failed: {e}") from None
  summary.written = writer.count
  summary.paths = [os.path.join(summary.out_dir, os.path.basename(p)) for p in writer.paths]


def _finish_build(kind: str, opts: BuildOptions, summary: Summary, staging: str,
                  inputs: Sequence[str]) -> None:
  """The classes and the summary (last) of a written build; BuildError when nothing was
  written."""
  if not summary.written:
    hint = ""
    if kind == "paired" and summary.skipped.keys() & {"missing_image", "missing_text"}:
      hint = (f"\n(are the field names right? --image_field={opts.image_field} "
              f"--caption_field={opts.caption_field})")
    elif kind == "text" and "missing_text" in summary.skipped:
      hint = f"\n(is the field name right? --text_field={opts.text_field})"
    elif kind in AUDIO_KINDS and summary.skipped.keys() & {"missing_audio", "missing_text",
                                                           "missing_image"}:
      image = f" --image_field={opts.image_field}" if kind == "trimodal" else ""
      hint = (f"\n(are the field names right? --audio_field={opts.audio_field} "
              f"--caption_field={opts.caption_field}{image})")
    raise BuildError(f"nothing written from {', '.join(inputs)}; "
                     + "\n".join(summary.format_skipped()) + hint)
  if summary.classes is not None:
    _write_json(os.path.join(staging, os.path.basename(summary.classes_path)), summary.classes)
  _write_json(os.path.join(staging, os.path.basename(summary.summary_path)), summary.to_dict())


_PART = ".process-{}.json"  # a process's counts in a multi-process build's staging folder


def _merge_parts(summary: Summary, staging: str, process_count: int) -> None:
  """Adds the other processes' counts (their part files, then removed) to process 0's."""
  for p in range(process_count):
    path = os.path.join(staging, _PART.format(p))
    if p:
      with open(path, encoding="utf-8") as f:
        part = json.load(f)
      summary.written += part["written"]
      summary.skipped.update(part["skipped"])
      for reason, ids in part["skip_examples"].items():
        kept = summary.skip_examples.setdefault(reason, [])
        kept.extend(ids[:max(0, SKIP_EXAMPLES_KEPT - len(kept))])
      summary.repaired.update(part["repaired"])
      summary.repaired_total += part["repaired_total"]
      for name, ids in part["repair_examples"].items():
        kept = summary.repair_examples.setdefault(name, [])
        kept.extend(ids[:max(0, SKIP_EXAMPLES_KEPT - len(kept))])
    if os.path.exists(path):
      os.remove(path)


def _together(what: Callable[[], Any], process_count: int) -> Any:
  """what() in every process; when it fails in any, it fails in all (each raising its own
  error, or one saying that another process failed)."""
  result, error = None, None
  try:
    result = what()
  except (BuildError, OSError) as e:
    error = e
  if process_count > 1 and multihost.any_true(error is not None) and error is None:
    raise BuildError("another process of this build failed (its output says why)")
  if error is not None:
    raise error
  return result


def build(kind: str, inputs: str | Sequence[str], out_dir: str, *, num_shards: int = 1,
          prefix: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
          max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, image_field: str = "image",
          caption_field: str = "caption", text_field: str = "text",
          text_chars: int = DEFAULT_TEXT_CHARS, audio_field: str = "audio",
          max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, overwrite: bool = False,
          process_index: int | None = None, process_count: int | None = None) -> Summary:
  """Converts `inputs` into `num_shards` shards `out_dir/PREFIX-*` (PREFIX defaults to kind).

  Raises BuildError (a ValueError) when the command cannot work; single bad examples are
  skipped and counted in the returned Summary instead. In a multi-process job (default: JAX's
  process index and count) every process calls it with the same arguments; each writes its
  shards, process 0 counts and installs them.
  """
  if kind not in KINDS:
    raise BuildError(f"kind={kind!r} is not one of {KINDS}")
  if num_shards < 1:
    raise BuildError(f"num_shards={num_shards} must be >= 1")
  if max_pixels < 1 or max_text_bytes < 1 or text_chars < 1 or not max_audio_seconds > 0:
    raise BuildError("max_pixels, max_text_bytes, text_chars and max_audio_seconds must be "
                     "positive")
  prefix = prefix or kind
  if os.sep in prefix or (os.altsep and os.altsep in prefix):
    raise BuildError(f"prefix={prefix!r} must be a file name, not a path (use --out for the "
                     "folder)")
  opts = BuildOptions(max_pixels=max_pixels, max_text_bytes=max_text_bytes,
                      image_field=image_field, caption_field=caption_field,
                      text_field=text_field, text_chars=text_chars, audio_field=audio_field,
                      max_audio_seconds=float(max_audio_seconds))
  paths = expand_inputs(inputs)
  summary = Summary(kind=kind, out_dir=out_dir, prefix=prefix,
                    inputs=[os.path.abspath(p) for p in paths], options=opts)
  if kind in CAPTION_KINDS:
    sources = [s for p in paths for s in _captions_sources(p, kind, opts)]
  elif kind == "image":
    sources = _image_sources(paths, opts, summary)
  else:
    sources = [s for p in paths for s in _text_sources(p, opts, summary)]

  existing = _existing_outputs(os.path.join(out_dir, prefix))
  if existing and not overwrite:
    raise BuildError(f"{out_dir} already holds {len(existing)} files of prefix {prefix!r} "
                     f"(e.g. {os.path.basename(existing[0])}); pass --overwrite, or choose "
                     "another --prefix or --out")
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if num_shards < process_count:
    raise BuildError(f"num_shards={num_shards} is less than the {process_count} processes "
                     "(each process writes whole shards)")
  primary = process_index == 0

  # The new build is written into a hidden folder inside --out and moved into place only when
  # it has finished: a build that fails leaves the old outputs (and nothing else) behind.
  # Process 0 makes it and installs the result; every process writes its own shards there.
  def make_staging() -> tuple[list[str], str]:
    if not primary:
      return [], ""
    created = _make_out_dir(out_dir)
    try:
      return created, tempfile.mkdtemp(dir=out_dir, prefix=f".{prefix}.building-")
    except OSError as e:
      _remove_dirs(created)
      raise BuildError(f"cannot write to --out={out_dir}: {e.strerror or e}") from None

  created, staging = _together(make_staging, process_count)
  if process_count > 1:
    staging = multihost.broadcast_text(staging)

  def write() -> None:
    try:
      _write_build(kind, sources, opts, summary, staging, num_shards, process_index,
                   process_count)
      if not primary:
        _write_json(os.path.join(staging, _PART.format(process_index)), summary.to_dict())
    except OSError as e:  # an input that cannot be read, a full disk
      raise BuildError(f"{e.filename or out_dir}: {e.strerror or e}") from None

  def install() -> None:
    if not primary:
      return
    try:
      _merge_parts(summary, staging, process_count)
      _finish_build(kind, opts, summary, staging, paths)
      _install(staging, out_dir, prefix, existing)
    except OSError as e:
      raise BuildError(f"{e.filename or out_dir}: {e.strerror or e}") from None

  try:
    _together(write, process_count)
    _together(install, process_count)
  except BaseException:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
      _remove_dirs(created)
    raise
  if primary:
    shutil.rmtree(staging, ignore_errors=True)
  elif process_count > 1:  # the job's summary, as process 0 wrote it
    with open(summary.summary_path, encoding="utf-8") as f:
      done = json.load(f)
    summary.written, summary.skipped = done["written"], collections.Counter(done["skipped"])
    summary.skip_examples = done["skip_examples"]
    summary.repaired = collections.Counter(done["repaired"])
    summary.repair_examples, summary.repaired_total = (done["repair_examples"],
                                                       done["repaired_total"])
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {list(argv[1:])}; inputs are given with "
                     "--input")
  multihost.initialize(False)  # a job's process when started by flava_jax.launch
  try:
    summary = build(f.kind, f.input, f.out, num_shards=f.num_shards, prefix=f.prefix,
                    max_pixels=f.max_pixels, max_text_bytes=f.max_text_bytes,
                    image_field=f.image_field, caption_field=f.caption_field,
                    text_field=f.text_field, text_chars=f.text_chars,
                    audio_field=f.audio_field, max_audio_seconds=f.max_audio_seconds,
                    overwrite=f.overwrite)
  except BuildError as e:
    raise SystemExit(f"error: {e}") from None
  multihost.say(summary.format())
  multihost.say(f"summary: {summary.summary_path}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("kind", None, list(KINDS), "what the inputs hold")
  flags.DEFINE_multi_string("input", None, "input paths (files, folders, globs); repeat the "
                            "flag or separate paths by commas")
  flags.DEFINE_string("out", None, "output folder")
  flags.DEFINE_integer("num_shards", 1, "number of shards to write round-robin")
  flags.DEFINE_string("prefix", None, "shard file name prefix (default: the kind)")
  flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "larger images are skipped (too_large)")
  flags.DEFINE_integer("max_text_bytes", DEFAULT_MAX_TEXT_BYTES,
                       "longer captions are skipped (text_too_long); texts are split into "
                       "chunks of about --text_chars first")
  flags.DEFINE_string("image_field", "image", "image path field of captions JSONL/CSV/TSV")
  flags.DEFINE_string("audio_field", "audio",
                      "audio path field of --kind=audio/trimodal captions JSONL/CSV/TSV")
  flags.DEFINE_float("max_audio_seconds", DEFAULT_MAX_AUDIO_SECONDS,
                     "longer audio files are skipped (audio_too_long)")
  flags.DEFINE_string("caption_field", "caption",
                      "caption field of captions JSONL/CSV/TSV and WebDataset .json members")
  flags.DEFINE_string("text_field", "text", "text field of --kind=text JSONL")
  flags.DEFINE_integer("text_chars", DEFAULT_TEXT_CHARS,
                       "paragraphs of .txt files are joined into examples of about this length; "
                       "longer paragraphs, lines and JSONL documents are split into chunks of "
                       "about this length")
  flags.DEFINE_bool("overwrite", False, "replace shards of the same prefix already in --out "
                    "(once the new build has finished; a failed build keeps the old one)")
  flags.mark_flags_as_required(["kind", "input", "out"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
