"""Speech from text with the eSpeak NG engine the `espeakng-loader` wheel bundles (no download).

    waves, rate = synthesize(["a red circle", "two blue squares"], Voice("en-us", 170, 50))

The shared library is loaded with ctypes and asked for synchronous synthesis (22,050 Hz, 16-bit).
Two things make eSpeak NG's samples vary. It seeds its noise generator with the clock's second
when it starts (the worker sets a fixed seed instead), and it carries state from one call to the
next inside a process (the same caption comes out a few samples longer or shorter after another,
whatever the seed). A fresh process with the fixed seed, making the same calls in the same order,
gives the same bytes every time. `synthesize`
therefore runs each batch of texts in a fresh process (espeak_worker.py, run as a script: it
imports neither flava_jax nor the caller's program): a batch's audio depends only on the batch
(its texts in order and the voice), never on what ran before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "espeak_worker.py")


@dataclasses.dataclass(frozen=True)
class Voice:
  """An eSpeak NG voice name ("en-us", "en", "en-us+f3": a variant), words per minute, pitch
  (0-99)."""

  name: str = "en-us"
  rate: int = 170
  pitch: int = 50


def _parse(data: bytes, count: int) -> tuple[list[np.ndarray], int]:
  rate, n = struct.unpack_from("<ii", data, 0)
  if n != count:
    raise RuntimeError(f"eSpeak NG worker returned {n} texts for {count}")
  offset, waves = 8, []
  for _ in range(n):
    (length,) = struct.unpack_from("<i", data, offset)
    offset += 4
    waves.append(np.frombuffer(data, "<i2", length, offset).astype(np.int16))
    offset += 2 * length
  if offset != len(data):
    raise RuntimeError("eSpeak NG worker's output is malformed")
  return waves, rate


def synthesize_int16(items: Sequence[tuple[str, Voice]],
                     seed: int = 0) -> tuple[list[np.ndarray], int]:
  """(int16 samples per (text, voice) item, sample rate), made in one fresh process whose noise
  generator starts from `seed`."""
  request = json.dumps({"items": [[t, v.name, int(v.rate), int(v.pitch)] for t, v in items],
                        "seed": int(seed)})
  done = subprocess.run([sys.executable, WORKER], input=request.encode("utf-8"),
                        capture_output=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"eSpeak NG failed: {done.stderr.decode('utf-8', 'replace').strip()}")
  return _parse(done.stdout, len(items))


def synthesize(texts: Sequence[str], voice: Voice = Voice(),
               seed: int = 0) -> tuple[list[np.ndarray], int]:
  """(float32 samples in [-1, 1] per text, sample rate), made in a fresh process."""
  waves, rate = synthesize_int16([(t, voice) for t in texts], seed)
  return [w.astype(np.float32) / 32768.0 for w in waves], rate
