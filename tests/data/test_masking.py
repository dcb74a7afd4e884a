"""Masking statistics and determinism (BEiT block masks, MLM token and whole-word masking)."""

import dataclasses

import numpy as np
import pytest

from flava_jax.data.masking import (
    IGNORE_INDEX, BlockMaskConfig, TokenMaskConfig, block_mask, mask_tokens)


def test_block_masks_never_exceed_the_target_and_average_close_to_it():
  rng = np.random.default_rng(0)
  counts, all_blocks = [], []
  for _ in range(2000):
    blocks = []
    mask = block_mask(rng, BlockMaskConfig(), blocks)
    assert mask.shape == (14, 14) and mask.dtype == bool
    counts.append(int(mask.sum()))
    all_blocks += blocks
  counts = np.asarray(counts)
  assert counts.max() <= 75
  assert counts.mean() >= 72, counts.mean()  # falls short only when no block fits
  for top, left, h, w in all_blocks:
    assert 0 < h < 14 and 0 < w < 14  # strictly inside the grid
    assert top + h <= 14 and left + w <= 14
    # Rounding h and w may stretch the drawn aspect by at most half a patch each way.
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
    assert h * w >= 1


def test_block_mask_parameters_are_honoured():
  cfg = BlockMaskConfig(grid_size=8, num_masked=20, min_block=4, min_aspect=0.5)
  rng = np.random.default_rng(1)
  counts = [int(block_mask(rng, cfg).sum()) for _ in range(300)]
  assert max(counts) <= 20 and np.mean(counts) > 17
  with pytest.raises(ValueError, match="num_masked"):
    BlockMaskConfig(num_masked=500)


def test_block_mask_is_deterministic_in_its_seed():
  a = block_mask(np.random.default_rng(42))
  b = block_mask(np.random.default_rng(42))
  c = block_mask(np.random.default_rng(43))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


CFG = TokenMaskConfig(vocab_size=1000, mask_id=4, special_ids=(0, 1, 2, 3, 4))


def _sequence(rng, length=200):
  ids = rng.integers(5, 1000, length)
  ids[0], ids[-1] = 2, 3  # [CLS] ... [SEP]
  ids[150:-1] = 0  # padding
  return ids


def test_token_masking_rates_within_sampling_error():
  rng = np.random.default_rng(0)
  chosen = eligible = masked = randomised = kept = 0
  for _ in range(400):
    ids = _sequence(rng)
    out, labels = mask_tokens(ids, rng, CFG)
    is_chosen = labels != IGNORE_INDEX
    special = np.isin(ids, CFG.special_ids)
    assert not np.any(is_chosen & special)  # never special tokens or padding
    assert np.array_equal(out[~is_chosen], ids[~is_chosen])
    assert np.array_equal(labels[is_chosen], ids[is_chosen])
    chosen += is_chosen.sum()
    eligible += (~special).sum()
    masked += (out[is_chosen] == CFG.mask_id).sum()
    kept += (out[is_chosen] == ids[is_chosen]).sum()
    randomised += ((out[is_chosen] != CFG.mask_id) & (out[is_chosen] != ids[is_chosen])).sum()
  rate = chosen / eligible
  sigma = np.sqrt(0.15 * 0.85 / eligible)
  assert abs(rate - 0.15) < 4 * sigma, rate
  for observed, expected in ((masked, 0.8), (randomised, 0.1), (kept, 0.1)):
    frac = observed / chosen
    # random replacement can redraw the same token (1/1000): folded into the tolerance
    assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / chosen) + 2e-3, frac


def test_whole_word_masking_takes_every_piece_of_a_word():
  cfg = TokenMaskConfig(vocab_size=1000, mask_id=4, special_ids=(0, 1, 2, 3, 4), whole_word=True,
                        rate=0.3)
  rng = np.random.default_rng(5)
  words_chosen = words = 0
  for _ in range(300):
    ids = _sequence(rng, 77)
    ids[60:-1] = 0
    starts = rng.random(77) < 0.6  # word boundaries; the rest are "##" continuation pieces
    starts[0] = starts[-1] = True
    _, labels = mask_tokens(ids, rng, cfg, word_starts=starts)
    is_chosen = labels != IGNORE_INDEX
    word = np.cumsum(starts)
    special = np.isin(ids, cfg.special_ids)
    for w in np.unique(word[~special]):
      pieces = (word == w) & ~special
      assert is_chosen[pieces].all() or not is_chosen[pieces].any()
      words += 1
      words_chosen += is_chosen[pieces].any()
  assert abs(words_chosen / words - 0.3) < 4 * np.sqrt(0.3 * 0.7 / words)
  with pytest.raises(ValueError, match="word_starts"):
    mask_tokens(np.arange(10), rng, cfg)


def test_token_masking_is_deterministic_in_its_seed():
  ids = _sequence(np.random.default_rng(0))
  a = mask_tokens(ids, np.random.default_rng(7), CFG)
  b = mask_tokens(ids, np.random.default_rng(7), CFG)
  c = mask_tokens(ids, np.random.default_rng(8), CFG)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("whole_word", [False, True], ids=["tokens", "whole_words"])
def test_max_predictions_caps_the_chosen_positions(whole_word):
  """At rate 0.5 most rows choose more than the cap: each keeps at most `cap` positions, whole
  words together, unchosen ones unmasked; rows under the cap are masked as without one."""
  cap = 20
  capped_cfg = TokenMaskConfig(vocab_size=1000, mask_id=4, special_ids=(0, 1, 2, 3, 4), rate=0.5,
                               whole_word=whole_word, max_predictions=cap)
  free_cfg = dataclasses.replace(capped_cfg, max_predictions=0)
  rng = np.random.default_rng(11)
  capped_rows = 0
  for _ in range(200):
    ids = _sequence(rng, 77)
    ids[int(rng.integers(10, 76)):-1] = 0  # lengths from a few tokens to the whole row
    starts = rng.random(77) < 0.6
    starts[0] = starts[-1] = True
    seed = int(rng.integers(1 << 30))
    out, labels = mask_tokens(ids, np.random.default_rng(seed), capped_cfg, starts)
    free_out, free_labels = mask_tokens(ids, np.random.default_rng(seed), free_cfg, starts)
    chosen, free_chosen = labels != IGNORE_INDEX, free_labels != IGNORE_INDEX
    assert chosen.sum() <= cap
    assert not np.any(chosen & ~free_chosen)  # a subset of what the draw chose
    assert np.array_equal(out[~chosen], ids[~chosen])
    if free_chosen.sum() <= cap:
      np.testing.assert_array_equal(labels, free_labels)
      np.testing.assert_array_equal(out, free_out)
      continue
    capped_rows += 1
    if not whole_word:
      assert chosen.sum() == cap
      continue
    word = np.cumsum(starts)
    for w in np.unique(word[free_chosen]):
      pieces = (word == w) & free_chosen
      # every word is kept whole or dropped, and a dropped one would not have fitted
      assert chosen[pieces].all() or (
          not chosen[pieces].any() and pieces.sum() > cap - chosen.sum())
  assert capped_rows > 50
  with pytest.raises(ValueError, match="max_predictions"):
    TokenMaskConfig(vocab_size=10, mask_id=4, special_ids=(0,), max_predictions=-1)
