"""Runs as a script in a fresh process (data/speech.py starts it).

Reads a JSON request on stdin, {"items": [[text, voice name, rate (words per minute), pitch
(0-99)], ...], "seed": the noise generator's seed}, and writes to stdout the sample rate and each text's 16-bit samples: int32 rate,
int32 count, then per text int32 length and the samples (little-endian). It imports only the
standard library, numpy and espeakng_loader, so that it starts in a fraction of a second and never
imports the caller's program."""

import ctypes
import json
import struct
import sys

import espeakng_loader
import numpy as np

OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT
CHARS_UTF8, POS_CHARACTER = 1, 1
RATE, PITCH = 1, 3  # espeak_PARAMETER


def main() -> None:
  request = json.loads(sys.stdin.read())
  lib = ctypes.CDLL(espeakng_loader.get_library_path())
  rate = lib.espeak_Initialize(OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
  if rate <= 0:
    sys.exit(f"eSpeak NG did not start (espeak_Initialize returned {rate})")
  # espeak_Initialize seeds the noise generator (aspiration, fricatives) with the clock's second:
  # a fixed seed makes the samples depend only on the request
  lib.espeak_ng_SetRandSeed(ctypes.c_long(int(request.get("seed", 0))))
  chunks = []
  callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)

  def collect(wav, count, events):
    del events
    if count > 0:
      chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
    return 0

  callback = callback_type(collect)  # kept alive for the library's calls
  lib.espeak_SetSynthCallback(callback)
  out = sys.stdout.buffer
  out.write(struct.pack("<ii", rate, len(request["items"])))
  voice = None
  for text, name, words_per_minute, pitch in request["items"]:
    if voice != (name, words_per_minute, pitch):
      voice = (name, words_per_minute, pitch)
      if lib.espeak_SetVoiceByName(name.encode()) != 0:
        sys.exit(f"eSpeak NG has no voice {name!r}")
      lib.espeak_SetParameter(RATE, int(words_per_minute), 0)
      lib.espeak_SetParameter(PITCH, int(pitch), 0)
    chunks.clear()
    data = text.encode("utf-8") + b"\0"
    error = lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data)), 0,
                             POS_CHARACTER, 0, CHARS_UTF8, None, None)
    if error != 0:
      sys.exit(f"eSpeak NG could not say {text!r} (error {error})")
    lib.espeak_Synchronize()
    wave = np.concatenate(chunks).astype("<i2") if chunks else np.zeros(0, "<i2")
    out.write(struct.pack("<i", len(wave)))
    out.write(wave.tobytes())
  out.flush()
  lib.espeak_Terminate()


if __name__ == "__main__":
  main()
