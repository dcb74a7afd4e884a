"""Audio decoding (data/audio.py) on files the test writes: every kind of bad audio is repaired
(resampled, downmixed, truncated WAV kept) or skipped with its reason; crops, pads and time masks."""

import io

import numpy as np
import pytest
import soundfile

from flava_jax.data import audio
from flava_jax.data.examples import Skip


def _encode(wave, rate, fmt="WAV", subtype=None):
  out = io.BytesIO()
  soundfile.write(out, wave, rate, format=fmt, subtype=subtype)
  return out.getvalue()


def _tone(seconds, rate, channels=1, freq=440.0):
  t = np.arange(int(seconds * rate)) / rate
  wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None),
                                         ("OGG", "VORBIS")])
def test_formats_decode_to_16khz_mono(fmt, subtype):
  wave, repairs = audio.decode_audio(_encode(_tone(0.5, 16000), 16000, fmt, subtype))
  assert wave.dtype == np.float32 and wave.ndim == 1 and repairs == []
  assert abs(len(wave) - 8000) <= 64 and 0.4 < np.abs(wave).max() < 0.6


def test_other_rates_and_channels_are_repaired():
  wave, repairs = audio.decode_audio(_encode(_tone(1.0, 22050, channels=2), 22050))
  assert repairs == ["downmixed", "resampled"] and abs(len(wave) - 16000) <= 2
  # The tone survives the resampling: its zero crossings say 440 Hz.
  crossings = np.sum(np.diff(np.sign(wave[100:-100])) != 0)
  assert abs(crossings / 2 / ((len(wave) - 200) / 16000) - 440) < 5
  mixed, _ = audio.decode_audio(_encode(np.stack([_tone(0.2, 16000), np.zeros(3200, np.float32)],
                                                 1), 16000))
  np.testing.assert_allclose(mixed, _tone(0.2, 16000) / 2, atol=1e-4)  # the channels' mean


def test_a_truncated_wav_keeps_its_samples_and_bad_audio_is_skipped_by_reason():
  data = _encode(_tone(0.5, 16000), 16000, subtype="PCM_16")
  wave, repairs = audio.decode_audio(data[:len(data) // 2])
  assert repairs == ["truncated"] and 3000 < len(wave) < 4100
  cases = {
      "missing_audio": None,
      "empty_audio": b"",
      "undecodable_audio": b"this is not audio at all" * 10,
      "silent_audio": _encode(np.zeros(8000, np.float32), 16000),
      "audio_too_long": _encode(_tone(3.0, 16000), 16000),
  }
  for reason, value in cases.items():
    with pytest.raises(Skip) as caught:
      audio.decode_audio(value, max_seconds=2.0)
    assert caught.value.reason == reason, (reason, caught.value)
  flac = _encode(_tone(1.0, 16000), 16000, "FLAC")
  with pytest.raises(Skip) as caught:  # a recognised header, then the stream breaks off
    audio.decode_audio(flac[:len(flac) // 3] + b"\x00" * 5)
  assert caught.value.reason in ("truncated_audio", "undecodable_audio")


def test_crop_pad_and_time_mask():
  wave = np.arange(1, 11, dtype=np.float32)
  padded, mask = audio.crop_or_pad(wave, 16)
  assert padded.tolist() == list(range(1, 11)) + [0] * 6 and mask.tolist() == [1] * 10 + [0] * 6
  start, mask = audio.crop_or_pad(wave, 4)
  assert start.tolist() == [1, 2, 3, 4] and mask.tolist() == [1] * 4
  rng = np.random.default_rng(0)
  crops = {tuple(audio.crop_or_pad(wave, 4, rng)[0]) for _ in range(50)}
  assert len(crops) == 7 and all(c[1] - c[0] == 1 for c in crops)  # every window, contiguous
  long = np.ones(1000, np.float32)
  mask = np.r_[np.ones(800, np.int32), np.zeros(200, np.int32)]
  masked = audio.time_mask(long, mask, np.random.default_rng(1), spans=2, max_width=100)
  zeroed = np.flatnonzero(masked == 0)
  assert 0 < len(zeroed) <= 200 and zeroed.max() < 800 and long.min() == 1  # a copy
