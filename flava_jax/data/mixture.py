"""Batching that counts bad examples, and the weighted per-step choice of a corpus.

Each step yields one homogeneous batch from one corpus (FLAVA's joint training), the corpus drawn
by its weight from a generator seeded with (seed, step): the sequence of corpora depends only on
the seed, and the state of the whole mixture is a step count plus each corpus stream's state.

Under grain's multiprocess prefetch every worker runs a copy of the mixture over its slice of each
corpus, and grain reads the workers round robin; the mixture learns its worker slot from grain's
slicing call, so that step k of worker w is global step k * workers + w and the corpus sequence
stays the same whatever the number of workers (the examples within a corpus do depend on it, as
grain documents for any pipeline).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

CORPUS_KEY = "_corpus"  # batch entry naming the corpus the batch came from
SKIPPED_KEY = "_skipped"  # batch entry {reason: count} of examples dropped while filling it


class TooManySkips(RuntimeError):
  pass


def _slice_parents(ds: Any, sl: slice, sequential_slice: bool) -> None:
  for parent in ds.parents:
    if hasattr(parent, "set_slice"):
      parent.set_slice(sl, sequential_slice)
    else:
      _slice_parents(parent, sl, sequential_slice)


class SkipCountingBatchIterDataset(grain.IterDataset):
  """Stacks `batch_size` good examples; {"_skip": reason} elements are dropped and counted.

  One bad example never costs a batch: the batch takes the next good one instead. A corpus whose
  last `max_consecutive_skips` examples were all bad is an error (nothing good is left to read).
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, corpus: str,
               max_consecutive_skips: int = 10_000):
    super().__init__(parent)
    self.batch_size = batch_size
    self.corpus = corpus
    self.max_consecutive_skips = max_consecutive_skips

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    _slice_parents(self, sl, sequential_slice)

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipCountingBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"SkipCountingBatchIterDataset({self.corpus}, batch_size={self.batch_size})"


class _SkipCountingBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, spec: SkipCountingBatchIterDataset):
    super().__init__(parent)
    self._spec = spec

  def __next__(self) -> dict:
    rows, skipped, run = [], collections.Counter(), 0
    while len(rows) < self._spec.batch_size:
      example = next(self._parent)
      if "_skip" in example:
        skipped[example["_skip"]] += 1
        run += 1
        if run >= self._spec.max_consecutive_skips:
          raise TooManySkips(
              f"corpus {self._spec.corpus!r}: the last {run} examples were all skipped "
              f"({dict(skipped)}); check its source and fields")
        continue
      run = 0
      rows.append(example)
    keys = rows[0].keys()
    batch = {k: np.stack([r[k] for r in rows]) for k in keys}
    batch[CORPUS_KEY] = self._spec.corpus
    batch[SKIPPED_KEY] = dict(skipped)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def choose_corpus(seed: int, step: int, cumulative: np.ndarray) -> int:
  """Index of the corpus for global step `step` (cumulative: normalised cumulative weights)."""
  u = np.random.default_rng([seed, step]).random()
  return int(min(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1))


class WeightedMixtureIterDataset(grain.IterDataset):
  """Per step, one batch from a corpus drawn by weight; deterministic in `seed`."""

  def __init__(self, streams: Mapping[str, grain.IterDataset], weights: Mapping[str, float],
               seed: int):
    names = sorted(streams)
    if set(weights) != set(names):
      raise ValueError(f"weights {sorted(weights)} do not match corpora {names}")
    if any(weights[n] <= 0 for n in names):
      raise ValueError(f"mixture weights must be positive, got {dict(weights)}")
    super().__init__([streams[n] for n in names])
    self.names = names
    total = sum(weights[n] for n in names)
    self.cumulative = np.cumsum([weights[n] / total for n in names])
    self.seed = seed
    self.offset, self.stride = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by grain's mp_prefetch in worker `sl.start` of `sl.step`."""
    self.offset, self.stride = sl.start or 0, sl.step or 1
    _slice_parents(self, sl, sequential_slice)

  def __iter__(self) -> grain.DatasetIterator:
    return _WeightedMixtureIterator([p.__iter__() for p in self.parents], self)

  def __str__(self) -> str:
    return f"WeightedMixtureIterDataset({dict(zip(self.names, np.diff(self.cumulative, prepend=0)))})"


class _WeightedMixtureIterator(grain.DatasetIterator):

  def __init__(self, parents: Sequence[grain.DatasetIterator], spec: WeightedMixtureIterDataset):
    super().__init__(parents)
    self._spec = spec
    self._step = 0  # steps taken by this iterator (this worker's share)

  def __next__(self):
    spec = self._spec
    global_step = self._step * spec.stride + spec.offset
    index = choose_corpus(spec.seed, global_step, spec.cumulative)
    batch = next(self._parents[index])
    self._step += 1
    return batch

  def get_state(self):
    return {"step": self._step,
            "corpora": {n: p.get_state() for n, p in zip(self._spec.names, self._parents)}}

  def set_state(self, state):
    self._step = state["step"]
    for name, parent in zip(self._spec.names, self._parents):
      if name in state["corpora"]:  # a corpus added since the checkpoint starts afresh
        parent.set_state(state["corpora"][name])
