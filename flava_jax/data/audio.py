"""Audio examples: encoded files (WAV, FLAC, OGG, ... through soundfile / libsndfile) decoded to
16 kHz mono float32, repaired where they can be and otherwise skipped with a counted reason.

    wave, repairs = decode_audio(data)             # float32 [N] at 16 kHz; repairs: what was fixed
    wave, mask = crop_or_pad(wave, length, rng)    # [length] each (rng: a random crop; None: start)
    wave = time_mask(wave, mask, rng, ...)         # SpecAugment-style: spans of samples zeroed

Repairs (kept, noted in `repairs`): another sample rate (resampled with soxr, "resampled"),
several channels (averaged, "downmixed"), a WAV whose data ends before its header says
("truncated": the samples that are there). Skips (examples.Skip): no audio field
(missing_audio), zero bytes (empty_audio), nothing libsndfile recognises (undecodable_audio), a
recognised file that fails while decoding (truncated_audio), no sample above `silence`
(silent_audio), longer than `max_seconds` before any crop (audio_too_long: a whole recording in
one example). Over-long examples within that limit are cropped by crop_or_pad.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from flava_jax.data.examples import Skip, as_encoded_bytes

SAMPLE_RATE = 16_000


def _wav_truncated(data: bytes) -> bool:
  """Whether a RIFF/WAVE file's data chunk claims more bytes than the file holds."""
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    return False
  offset = 12
  while offset + 8 <= len(data):
    chunk, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
    if chunk == b"data":
      return offset + 8 + size > len(data)
    offset += 8 + size + (size & 1)
  return False


def decode_audio(value: Any, sample_rate: int = SAMPLE_RATE, max_seconds: float = 600.0,
                 silence: float = 1e-4) -> tuple[np.ndarray, list[str]]:
  """An audio field (encoded bytes) -> (float32 mono samples at `sample_rate`, repairs made),
  or Skip (see the module docstring)."""
  import soundfile  # pylint: disable=import-outside-toplevel
  value = as_encoded_bytes(value, "audio")
  try:
    info = soundfile.info(io.BytesIO(value))
  except Exception as e:  # pylint: disable=broad-except  (libsndfile's errors, any format)
    raise Skip("undecodable_audio", str(e)[:200]) from None
  if info.frames > max_seconds * info.samplerate:
    raise Skip("audio_too_long", f"{info.frames / info.samplerate:.1f} s > {max_seconds} s")
  try:
    wave, rate = soundfile.read(io.BytesIO(value), dtype="float32", always_2d=True)
  except Exception as e:  # pylint: disable=broad-except
    raise Skip("truncated_audio", str(e)[:200]) from None
  repairs = []
  if _wav_truncated(value):
    repairs.append("truncated")
  if wave.shape[1] > 1:
    wave = wave.mean(axis=1, keepdims=True)
    repairs.append("downmixed")
  wave = wave[:, 0]
  if rate != sample_rate:
    import soxr  # pylint: disable=import-outside-toplevel
    wave = soxr.resample(wave, rate, sample_rate).astype(np.float32)
    repairs.append("resampled")
  if not wave.size:
    raise Skip("empty_audio", "no samples")
  if not np.isfinite(wave).all():
    raise Skip("undecodable_audio", "non-finite samples")
  if np.max(np.abs(wave)) < silence:
    raise Skip("silent_audio", f"peak {np.max(np.abs(wave)):.2g} < {silence}")
  return np.ascontiguousarray(wave, np.float32), repairs


def crop_or_pad(wave: np.ndarray, length: int, rng: np.random.Generator | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(samples [length] float32, mask [length] int32: 1 for real samples). Longer audio is cropped
  (a random window with `rng`, else the start); shorter audio is padded with zeros."""
  if len(wave) > length:
    start = int(rng.integers(0, len(wave) - length + 1)) if rng is not None else 0
    return wave[start:start + length].astype(np.float32), np.ones(length, np.int32)
  out = np.zeros(length, np.float32)
  out[:len(wave)] = wave
  mask = np.zeros(length, np.int32)
  mask[:len(wave)] = 1
  return out, mask


def time_mask(wave: np.ndarray, mask: np.ndarray, rng: np.random.Generator, spans: int = 2,
              max_width: int = 1600) -> np.ndarray:
  """SpecAugment-style time masking on samples: `spans` spans of up to `max_width` samples
  (1,600 = 0.1 s at 16 kHz) inside the real samples zeroed. Returns a copy."""
  out = np.array(wave, np.float32)
  real = int(mask.sum())
  for _ in range(spans):
    width = int(rng.integers(0, max_width + 1))
    if real <= width or width == 0:
      continue
    start = int(rng.integers(0, real - width + 1))
    out[start:start + width] = 0.0
  return out
