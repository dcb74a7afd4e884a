"""eSpeak NG speech (data/speech.py): a batch's audio is the same in every run, different captions
and voices give different audio, and the audio is speech-like (length, level); the noise comes
from the given seed (eSpeak NG seeds it with the clock's second when left alone)."""

import numpy as np

from flava_jax.data import speech

CAPTIONS = ["a picture of two small red circles", "a large blue square on the left"]


def test_synthesis_is_deterministic_per_batch_and_differs_between_captions_and_voices():
  first, rate = speech.synthesize(CAPTIONS)
  again, _ = speech.synthesize(CAPTIONS)
  assert rate == 22050
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  a, b = first
  assert 1.0 < len(a) / rate < 3.5 and 1.0 < len(b) / rate < 3.5  # a few words each
  assert 0.05 < np.abs(a).max() <= 1.0 and a.dtype == np.float32
  n = min(len(a), len(b))
  assert np.abs(a[:n] - b[:n]).mean() > 0.01  # another caption, other audio
  (gb,), _ = speech.synthesize(CAPTIONS[:1], speech.Voice("en+f3", rate=140, pitch=70))
  assert len(gb) != len(a) or np.abs(gb - a).mean() > 0.01
  assert len(gb) > len(a)  # slower speech is longer


def test_the_noise_follows_the_seed_not_the_clock():
  breathy = speech.Voice("en+f3")  # the +f3 variants mix noise into the voice
  (zero,), _ = speech.synthesize(CAPTIONS[:1], breathy)
  (again,), _ = speech.synthesize(CAPTIONS[:1], breathy, seed=0)
  (other,), _ = speech.synthesize(CAPTIONS[:1], breathy, seed=12345)
  np.testing.assert_array_equal(zero, again)
  assert len(zero) == len(other) and np.abs(zero - other).max() > 0.01  # the seed is used
