"""Speech from text with the eSpeak NG engine the `espeakng-loader` wheel bundles (no download).

    waves, rate = synthesize(["a red circle", "two blue squares"], Voice("en-us", 170, 50))

The shared library is loaded with ctypes and asked for synchronous synthesis (22,050 Hz, 16-bit).
eSpeak NG is not deterministic from call to call inside one process (the same caption comes out a
few samples longer or shorter, with other bytes, even after resetting its random seed), but a fresh
process making the same calls in the same order gives the same bytes every time. `synthesize`
therefore runs each batch of texts in a fresh process ("spawn"): a batch's audio depends only on
the batch (its texts in order and the voice), never on what ran before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
from collections.abc import Sequence

import numpy as np

OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT
CHARS_UTF8, POS_CHARACTER = 1, 1
RATE, VOLUME, PITCH = 1, 2, 3  # espeak_PARAMETER


@dataclasses.dataclass(frozen=True)
class Voice:
  """An eSpeak NG voice name ("en-us", "en", "en-us+f3": a variant), words per minute, pitch
  (0-99)."""

  name: str = "en-us"
  rate: int = 170
  pitch: int = 50


def _synthesize_here(texts: Sequence[str], voice: Voice) -> tuple[list[np.ndarray], int]:
  """In this process: int16 samples per text, and the sample rate."""
  import espeakng_loader  # pylint: disable=import-outside-toplevel
  lib = ctypes.CDLL(espeakng_loader.get_library_path())
  rate = lib.espeak_Initialize(OUTPUT_SYNCHRONOUS, 0,
                               espeakng_loader.get_data_path().encode(), 0)
  if rate <= 0:
    raise RuntimeError(f"eSpeak NG did not start (espeak_Initialize returned {rate})")
  chunks: list[np.ndarray] = []
  callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)

  def collect(wav, count, events):
    del events
    if count > 0:
      chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
    return 0

  callback = callback_type(collect)  # kept alive for the library's calls
  lib.espeak_SetSynthCallback(callback)
  if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
    raise ValueError(f"eSpeak NG has no voice {voice.name!r}")
  lib.espeak_SetParameter(RATE, int(voice.rate), 0)
  lib.espeak_SetParameter(PITCH, int(voice.pitch), 0)
  out = []
  for text in texts:
    chunks.clear()
    data = text.encode("utf-8") + b"\0"
    error = lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data)), 0,
                             POS_CHARACTER, 0, CHARS_UTF8, None, None)
    if error != 0:
      raise RuntimeError(f"eSpeak NG could not say {text!r} (error {error})")
    lib.espeak_Synchronize()
    out.append(np.concatenate(chunks) if chunks else np.zeros(0, np.int16))
  lib.espeak_Terminate()
  return out, rate


def _worker(args):
  texts, voice = args
  return _synthesize_here(texts, voice)


def synthesize(texts: Sequence[str], voice: Voice = Voice()) -> tuple[list[np.ndarray], int]:
  """(float32 samples in [-1, 1] per text, sample rate), made in a fresh process."""
  context = multiprocessing.get_context("spawn")
  with context.Pool(1) as pool:
    waves, rate = pool.apply(_worker, ((list(texts), voice),))
  return [w.astype(np.float32) / 32768.0 for w in waves], rate
