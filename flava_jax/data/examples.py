"""The canonical example every source is mapped to, and the checks that decide whether it is kept.

An example is a dict with any of: image (encoded bytes), caption (str), text (str), label (int).
An example that cannot be used raises `Skip(reason)`; the pipeline and the builder count skips by
reason instead of dying or silently dropping data. The reasons:

    missing_image      the image field is absent, or names a file that does not exist
    empty_image        zero bytes
    undecodable        not an image PIL can read
    truncated_image    an image whose data ends early
    too_large          more pixels than the configured limit (decompression bombs, bad headers)
    missing_text       the caption/text field is absent
    empty_text         nothing but white space
    non_utf8_text      bytes that are mostly not UTF-8 (a few bad bytes are replaced and kept)
    text_too_long      more bytes than the configured limit (a whole file in a caption field)
    unreadable_record  the storage layer failed to return the record
    corrupt_record     the record's bytes do not parse
    missing_audio      the audio field is absent (data/audio.py)
    empty_audio        zero bytes, or no samples
    undecodable_audio  not audio libsndfile recognises (or non-finite samples)
    truncated_audio    a recognised file that fails while decoding
    silent_audio       no sample above the silence threshold
    audio_too_long     longer than the configured limit before any crop
"""

from __future__ import annotations

from typing import Any

import numpy as np

SKIP_REASONS = ("missing_image", "empty_image", "undecodable", "truncated_image", "too_large",
                "missing_text", "empty_text", "non_utf8_text", "text_too_long",
                "unreadable_record", "corrupt_record", "missing_audio", "empty_audio",
                "undecodable_audio", "truncated_audio", "silent_audio", "audio_too_long")
# Text with more than this share of undecodable bytes is skipped rather than repaired.
MAX_REPLACED_FRACTION = 0.1


class Skip(ValueError):
  """An example that cannot be used; `reason` (one of SKIP_REASONS) names the skip counter."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def as_text(value: Any, max_bytes: int) -> str:
  """A caption or text field -> clean str (white space collapsed), or Skip.

  bytes are decoded as UTF-8; a few invalid bytes are replaced, mostly invalid ones are skipped.
  A list or array of strings (several captions) must be reduced to one before calling this.
  """
  if value is None:
    raise Skip("missing_text")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, bytearray, memoryview)):
    raw = bytes(value)
    if len(raw) > max_bytes:
      raise Skip("text_too_long", f"{len(raw)} bytes > {max_bytes}")
    try:
      value = raw.decode("utf-8")
    except UnicodeDecodeError:
      value = raw.decode("utf-8", errors="replace")
      if value.count("\ufffd") > MAX_REPLACED_FRACTION * max(len(value), 1):
        raise Skip("non_utf8_text") from None
  elif isinstance(value, str):
    if len(value) > max_bytes or len(value.encode("utf-8", errors="replace")) > max_bytes:
      raise Skip("text_too_long", f"{len(value)} characters")
  else:
    raise Skip("missing_text", f"a {type(value).__name__}, not text")
  text = " ".join(value.split())
  if not text:
    raise Skip("empty_text")
  return text


def as_encoded_bytes(value: Any, kind: str = "image") -> bytes:
  """An encoded file field (`kind`: image or audio) -> non-empty bytes, or Skip
  (missing_KIND, empty_KIND)."""
  if value is None:
    raise Skip(f"missing_{kind}")
  if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytearray, memoryview)):
    value = bytes(value)
  if not isinstance(value, bytes):
    raise Skip(f"missing_{kind}", f"a {type(value).__name__}, not encoded {kind} bytes")
  if not value:
    raise Skip(f"empty_{kind}")
  return value


def as_image_bytes(value: Any) -> bytes:
  """An image field -> non-empty encoded bytes, or Skip."""
  return as_encoded_bytes(value, "image")
