"""SIGTERM (TPU maintenance, SLURM, `kill`) and SIGINT (Ctrl-C) as a request to stop cleanly.

A run installs `StopRequests` for its whole life (start-up, training, the final evaluation): the
first signal sets a flag that the loop reads at its safe points (between steps, between
evaluations), where it saves a checkpoint and exits 0. A second SIGINT means "now": it raises
KeyboardInterrupt, which the binaries report as a stop without saving. Grain's worker processes
ignore SIGINT (`ignore_interrupts`, their init function), so a Ctrl-C that a terminal sends to the
whole process group reaches only the main process's handler.
"""

from __future__ import annotations

import signal

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
_CODES = {"": 0, "SIGTERM": 1, "SIGINT": 2}  # a request as a number the processes of a job vote


def code_of(requested: str) -> int:
  return _CODES[requested]


def name_of(code: int) -> str:
  """The request of the highest code (0: none -> "")."""
  return {v: k for k, v in _CODES.items()}[int(code)]


class StopRequests:
  """`requested`: the name of the first stop signal received ("" while none came)."""

  def __init__(self):
    self.requested = ""
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    for signum in NAMES:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: the caller's handlers stay
        break
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt("second SIGINT")
    if not self.requested:
      self.requested = NAMES[signum]

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()


def ignore_interrupts(worker_index: int = 0, worker_count: int = 0) -> None:
  """A grain worker's init function: SIGINT is the main process's to handle."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
