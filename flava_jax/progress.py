"""What a training run reports: metric rows (stdout, metrics.jsonl, TensorBoard), step timing.

    StepClock     how long each step really took: from the moment the previous step's results
                  were on the host to the moment this step's are, less the compiles, saves and
                  evaluations in between (each timed apart); an ETA from those figures
    CorpusMeans   per-corpus means of every step metric since the last log line
    SkipRates     per-corpus share of skipped (bad) examples since the last log line, warnings
    MetricWriter  one row per step to metrics.jsonl and TensorBoard, a progress line on stdout
                  (process 0 only); metric names are the same in all three places
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"

# TensorBoard rewrites any other character to "_": names that pass are the same everywhere.
_NAME = re.compile(r"^[-\w./]+$")


def check_name(name: str) -> str:
  if not _NAME.match(name) or name.startswith("/"):
    raise ValueError(f"metric name {name!r}: use letters, digits and -_./ only (TensorBoard "
                     "would rename it)")
  return name


# JAX's compile events (tracing, lowering, XLA compilation or a persistent-cache read).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class StepClock:
  """How long each step took, compiles apart, without the host's one-step lag.

  A step starts when the host begins fetching its batch, or when the previous step's results
  reached the host if that is later (the host runs ahead of the device), and ends when its own
  results reach the host; JAX compiles in between (timed by JAX's compile events while
  `listening()`) are subtracted. Work between steps (a save, an evaluation) falls outside every
  step's span; `with clock.paused(kind):` times it for the ETA.

  The loop calls `begin(step)` before fetching the step's batch and `ready(step)` once its
  metrics are on the host (-> the step's seconds).
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._last_ready = None
    self._begun: dict[int, float] = {}
    self._compiles: list[tuple[float, float]] = []  # (when it ended, seconds)
    self.step_seconds: list[float] = []
    self.pauses = collections.defaultdict(list)  # kind -> durations
    self.compile_seconds = 0.0  # every compile so far

  def begin(self, step: int) -> None:
    self._begun[step] = self._clock()

  def ready(self, step: int) -> float:
    now = self._clock()
    start = self._begun.pop(step, now)
    if self._last_ready is not None:
      start = max(start, self._last_ready)
    compiling = sum(s for t, s in self._compiles if start < t <= now)
    self._compiles = [(t, s) for t, s in self._compiles if t > now]
    self._last_ready = now
    seconds = max(now - start - compiling, 1e-9)
    self.step_seconds.append(seconds)
    return seconds

  @contextlib.contextmanager
  def paused(self, kind: str):
    """Times work between steps (its own compiles left out: they happen once)."""
    started, compiled = self._clock(), self.compile_seconds
    try:
      yield
    finally:
      self.pauses[kind].append(self._clock() - started - (self.compile_seconds - compiled))

  def compiled(self, seconds: float) -> None:
    self.compile_seconds += seconds
    self._compiles.append((self._clock(), seconds))

  def _on_event(self, event: str, seconds: float, **unused) -> None:
    if event in COMPILE_EVENTS:
      self.compiled(seconds)

  @contextlib.contextmanager
  def listening(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    try:
      yield self
    finally:
      jax.monitoring.unregister_event_duration_listener(self._on_event)

  def mean(self, kind: str) -> float | None:
    values = self.pauses.get(kind)
    return sum(values) / len(values) if values else None

  def eta(self, steps_left: int, compiles_left: int = 0, saves_left: int = 0,
          evals_left: int = 0, compile_guess: float | None = None) -> str:
    """Seconds to the end: steps at their median time, plus the compiles, saves and
    evaluations still to come at their mean times so far ("+ kind" where none was timed)."""
    if not self.step_seconds:
      return "?"
    recent = sorted(self.step_seconds[-50:])
    total = recent[len(recent) // 2] * steps_left
    unknown = []
    means = {"compile": compile_guess, "save": self.mean("save"),
             "evaluation": self.mean("evaluation")}
    for kind, count in (("compile", compiles_left), ("save", saves_left),
                        ("evaluation", evals_left)):
      if count:
        if means[kind] is None:
          unknown.append(kind)
        else:
          total += means[kind] * count
    return f"{total:.0f}s" + "".join(f" + {k}" for k in unknown)


class CorpusMeans:
  """Sums of each corpus's step metrics since the last `take()`."""

  def __init__(self):
    self._sums = collections.defaultdict(lambda: collections.defaultdict(float))
    self._counts = collections.Counter()

  def add(self, corpus: str, metrics: Mapping[str, float]) -> None:
    self._counts[corpus] += 1
    for key, value in metrics.items():
      self._sums[corpus][key] += float(value)

  def take(self) -> dict[str, float]:
    """{"corpus/metric": mean over its steps since the last take, "corpus/steps": n}."""
    out = {}
    for corpus, count in self._counts.items():
      for key, total in self._sums[corpus].items():
        out[f"{corpus}/{key}"] = total / count
      out[f"{corpus}/steps"] = count
    self._sums.clear()
    self._counts.clear()
    return out


class SkipRates:
  """Per corpus, the share of its examples skipped (bad data) since the last `take`, and a
  warning for each corpus above `warn_above` naming its reasons."""

  def __init__(self, corpora, rows_per_batch: int, warn_above: float = 0.1):
    self.corpora = list(corpora)
    self.rows = rows_per_batch
    self.warn_above = warn_above
    self._skipped = collections.Counter()
    self._batches = collections.Counter()

  def take(self, skipped: Mapping[str, int], batches: Mapping[str, int]
           ) -> tuple[dict[str, float], list[str]]:
    """skipped: {"corpus/reason": total}, batches: {corpus: total delivered} -> (rates, warnings)."""
    rates, warnings = {}, []
    for corpus in self.corpora:
      new = {k.split("/", 1)[1]: v - self._skipped[k] for k, v in sorted(skipped.items())
             if k.startswith(corpus + "/") and v > self._skipped[k]}
      delivered = (batches.get(corpus, 0) - self._batches[corpus]) * self.rows
      total = sum(new.values()) + delivered
      if not total:
        continue
      rates[corpus] = sum(new.values()) / total
      if rates[corpus] > self.warn_above:
        reasons = ", ".join(f"{reason} {count}" for reason, count in new.items())
        warnings.append(f"corpus {corpus} skipped {rates[corpus]:.0%} of its examples since "
                        f"the last log line ({reasons}): check data.corpora.{corpus}")
    self._skipped = collections.Counter(skipped)
    self._batches = collections.Counter(batches)
    return rates, warnings


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch whenever
  it is installed (seconds of every start, on Colab too) only to accept torch tensors, which
  this writer never passes; a torch the process already imported is left as it is."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Progress lines on stdout, WORKDIR/metrics.jsonl and TensorBoard events (process 0 only).

  metrics.jsonl is opened for appending; if it is deleted or moved while the run writes, a new
  one is started (with a warning) rather than writing into the vanished file.
  """

  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._open()
      if tensorboard:
        try:
          self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
        except ImportError:
          logging.warning("tensorboardX is not installed: no TensorBoard events")

  def _open(self) -> None:
    self._jsonl = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._inode = os.fstat(self._jsonl.fileno()).st_ino

  def _file_moved(self) -> bool:
    try:
      return os.stat(self.path).st_ino != self._inode
    except FileNotFoundError:
      return True

  def write(self, step: int, metrics: Mapping[str, float], progress: bool = True,
            eta: str | None = None) -> None:
    if not self.enabled:
      return
    for name in metrics:
      check_name(name)
    if self._file_moved():
      self._jsonl.close()
      self._open()
      print(f"warning: {self.path} was deleted or moved during the run; rows from step {step} "
            "on go to a new file there", flush=True)
    self._jsonl.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if progress:
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                       if k.endswith("loss") or k.startswith("skip_rate/")
                       or k in ("examples_per_s", "mfu", "learning_rate"))
      print(f"step {step}/{self.total_steps} {shown}" + (f" eta {eta}" if eta else ""),
            flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def logged_steps(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (unreadable lines skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows
