"""Masking for the data pipeline, in numpy with a per-example Generator (deterministic in its seed).

- `block_mask`: BEiT block-wise masking of a patch grid (MIM and MMM-image).
- `mask_tokens`: BERT-style MLM masking (15% chosen; of those 80% [MASK], 10% random, 10% kept),
  per token or per whole word (MMM-text on paired captions uses whole words).
Positions not chosen get the label IGNORE_INDEX (-100).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The label of positions with no target: PyTorch's cross-entropy default, which transformers and
# the losses (losses/masked.py) use too.
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class BlockMaskConfig:
  """BEiT's defaults for a 14x14 grid: 75 patches, blocks of >= 16, aspect in [0.3, 1/0.3]."""

  grid_size: int = 14
  num_masked: int = 75
  min_block: int = 16
  max_block: int | None = None  # None: up to num_masked
  min_aspect: float = 0.3
  max_aspect: float | None = None  # None: 1 / min_aspect
  attempts: int = 10

  def __post_init__(self):
    if not 0 < self.num_masked <= self.grid_size**2:
      raise ValueError(f"block_mask.num_masked={self.num_masked} must be in (0, "
                       f"{self.grid_size**2}]")
    if self.min_block <= 0 or self.min_aspect <= 0:
      raise ValueError("block_mask.min_block and block_mask.min_aspect must be positive")


def _add_block(mask: np.ndarray, budget: int, cfg: BlockMaskConfig, rng: np.random.Generator,
               blocks: list | None) -> int:
  """Tries up to cfg.attempts random blocks; masks the first that adds patches within budget."""
  height, width = mask.shape
  max_aspect = cfg.max_aspect or 1 / cfg.min_aspect
  log_aspect = (math.log(cfg.min_aspect), math.log(max_aspect))
  # One draw per call for all attempts: (area, aspect, top, left) uniforms.
  draws = rng.random((cfg.attempts, 4))
  for u_area, u_aspect, u_top, u_left in draws.tolist():
    # Between min_block and the budget; when the budget is below min_block the draw lies in
    # [budget, min_block] and the budget check below decides (as BEiT's generator behaves).
    area = cfg.min_block + (budget - cfg.min_block) * u_area
    aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if h >= height or w >= width:  # the block must fit strictly inside the grid
      continue
    top = int(u_top * (height - h + 1))
    left = int(u_left * (width - w + 1))
    window = mask[top:top + h, left:left + w]
    added = h * w - int(window.sum())
    if 0 < added <= budget:
      window[...] = True
      if blocks is not None:
        blocks.append((top, left, h, w))
      return added
  return 0


def block_mask(rng: np.random.Generator, cfg: BlockMaskConfig = BlockMaskConfig(),
               blocks: list | None = None) -> np.ndarray:
  """A [grid, grid] bool mask with at most cfg.num_masked patches, made of rectangular blocks.

  Stops early when no block adds a patch (so the count can fall short of the target, never over).
  `blocks`, when given, receives the (top, left, height, width) of every block placed.
  """
  mask = np.zeros((cfg.grid_size, cfg.grid_size), bool)
  count = 0
  while count < cfg.num_masked:
    budget = cfg.num_masked - count
    if cfg.max_block is not None:
      budget = min(budget, cfg.max_block)
    added = _add_block(mask, budget, cfg, rng, blocks)
    if added == 0:
      break
    count += added
  return mask


@dataclasses.dataclass(frozen=True)
class TokenMaskConfig:
  vocab_size: int
  mask_id: int
  special_ids: tuple[int, ...]  # never chosen (pad, [CLS], [SEP], ...)
  rate: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1  # the rest keeps the original token
  whole_word: bool = False
  # At most this many positions chosen per sequence (0: no cap), as BERT's
  # max_predictions_per_seq: the train step's prediction slots (loss.*_prediction_slots). When the
  # draw chooses more, a random subset of the chosen tokens (whole words: of the chosen words)
  # that fits is kept; the others stay unmasked and unlabelled.
  max_predictions: int = 0

  def __post_init__(self):
    if not 0 < self.rate < 1:
      raise ValueError(f"mlm.rate={self.rate} must be in (0, 1)")
    if self.max_predictions < 0:
      raise ValueError(f"mlm.max_predictions={self.max_predictions} must be >= 0")
    if self.mask_fraction + self.random_fraction > 1:
      raise ValueError("mlm.mask_fraction + mlm.random_fraction must be <= 1")


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, cfg: TokenMaskConfig,
                word_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Masks one sequence [L]: returns (masked ids, labels with IGNORE_INDEX where not chosen).

  whole_word: word_starts [L] bool marks the first WordPiece of each word; a word is chosen as a
  unit (all of its pieces). Special tokens and padding are never chosen.
  """
  ids = np.asarray(ids)
  eligible = np.ones(ids.shape, bool)
  for special in cfg.special_ids:  # a few comparisons beat np.isin on short rows
    eligible &= ids != special
  chosen_draw, action = rng.random((2,) + ids.shape)
  if cfg.whole_word:
    if word_starts is None:
      raise ValueError("whole-word masking needs word_starts")
    starts = np.asarray(word_starts, bool) & eligible
    word_index = np.cumsum(starts) - 1  # the word each position belongs to (-1 before any)
    # A word is chosen by the draw at its first piece.
    chosen_words = chosen_draw[starts] < cfg.rate
    chosen = eligible & (word_index >= 0) & chosen_words[np.maximum(word_index, 0)] if (
        chosen_words.size) else np.zeros(ids.shape, bool)
  else:
    chosen = eligible & (chosen_draw < cfg.rate)
    word_index = None
  if cfg.max_predictions and chosen.sum() > cfg.max_predictions:
    chosen = _cap_chosen(chosen, word_index, cfg.max_predictions, rng)
  labels = np.where(chosen, ids, IGNORE_INDEX)
  to_mask = chosen & (action < cfg.mask_fraction)
  to_random = chosen & (action >= cfg.mask_fraction) & (
      action < cfg.mask_fraction + cfg.random_fraction)
  masked = np.where(to_mask, cfg.mask_id, ids)
  if to_random.any():
    masked = np.where(to_random, rng.integers(0, cfg.vocab_size, ids.shape), masked)
  return masked.astype(ids.dtype), labels.astype(np.int32)


def _cap_chosen(chosen: np.ndarray, word_index: np.ndarray | None, cap: int,
                rng: np.random.Generator) -> np.ndarray:
  """A random part of `chosen` with at most `cap` positions, whole words kept together."""
  positions = np.flatnonzero(chosen)
  if word_index is None:
    keep = rng.choice(positions, cap, replace=False)
  else:
    words, sizes = np.unique(word_index[positions], return_counts=True)
    kept, room = [], cap
    for i in rng.permutation(len(words)):  # shuffled words, each kept while it still fits
      if sizes[i] <= room:
        kept.append(words[i])
        room -= sizes[i]
    keep = positions[np.isin(word_index[positions], kept)]
  capped = np.zeros_like(chosen)
  capped[keep] = True
  return capped
