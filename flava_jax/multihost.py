"""One job, several processes: joining them, and the decisions they must take together.

A TPU pod slice runs one process per host, a GPU cluster one per node or per GPU, and
`python -m flava_jax.launch` N on this machine. Every process runs the same program on its own
share of the data; whatever decides the program's path (stop now? is this checkpoint readable?
did start-up fail anywhere?) must come out the same in all of them, or one process waits in a
collective that the others never enter. The helpers here take such a decision from every
process's own answer (`any_true`, `max_int`, `StopVotes`); with one process they cost nothing.

How a process joins the job (`initialize`):
  - launched by flava_jax.launch: FLAVA_JAX_NUM_PROCESSES and FLAVA_JAX_PROCESS_ID, with JAX's
    JAX_COORDINATOR_ADDRESS (process 0's host:port);
  - --multiprocess on a TPU VM slice or under SLURM: jax.distributed.initialize() reads the
    slice's metadata or SLURM's variables itself.
A process that dies (SIGKILL, a crash) stops the others: its heartbeats stop and JAX's
coordination service ends every other process with a message naming it, after at most
FLAVA_JAX_HEARTBEAT_SECONDS (default 100).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

NUM_PROCESSES_ENV = "FLAVA_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "FLAVA_JAX_PROCESS_ID"
HEARTBEAT_ENV = "FLAVA_JAX_HEARTBEAT_SECONDS"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX's own variable


def initialize(multiprocess: bool, environ: Mapping[str, str] = os.environ) -> str:
  """Joins the other processes of the job; returns how ("" when this is a one-process run)."""
  heartbeat = heartbeat_seconds(environ)
  if NUM_PROCESSES_ENV in environ:
    missing = [v for v in (PROCESS_ID_ENV, COORDINATOR_ENV) if not environ.get(v)]
    if missing:
      raise ValueError(f"{NUM_PROCESSES_ENV} is set but {', '.join(missing)} is not")
    jax.distributed.initialize(
        coordinator_address=environ[COORDINATOR_ENV],
        num_processes=int(environ[NUM_PROCESSES_ENV]),
        process_id=int(environ[PROCESS_ID_ENV]), heartbeat_timeout_seconds=heartbeat)
    return f"process {environ[PROCESS_ID_ENV]} of {environ[NUM_PROCESSES_ENV]} " \
           f"(coordinator {environ[COORDINATOR_ENV]})"
  if multiprocess:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    return "jax.distributed.initialize() from the cluster's environment"
  return ""


def heartbeat_seconds(environ: Mapping[str, str] = os.environ) -> int:
  return int(environ.get(HEARTBEAT_ENV, "100"))


def lost_processes() -> list[int] | None:
  """The processes of the job that JAX's coordination service no longer hears from, once it
  knows (it waits for every live process to answer, or for a dead one's heartbeat timeout);
  None when the service cannot tell (no job, or this JAX lacks the query)."""
  try:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel
    everyone = list(range(jax.process_count()))
    live = distributed.global_state.client.get_live_nodes(everyone)
  except Exception:  # pylint: disable=broad-except  (a private API: any failure means "unknown")
    return None
  return sorted(set(everyone) - set(live))


def is_primary() -> bool:
  """Process 0: the one that prints, writes metrics and moves files in a shared workdir."""
  return jax.process_index() == 0


def say(*args, sep: str = " ", end: str = "\n", file=None) -> None:
  """print() on process 0 only (flushed): a job's progress is told once. The line goes out in
  one write: print() writes its text and its end separately when Python runs unbuffered
  (PYTHONUNBUFFERED), and another process's line relayed to the same terminal could land
  between them."""
  if is_primary():
    out = file or sys.stdout
    out.write(sep.join(str(a) for a in args) + end)
    out.flush()


def gather_ints(value: int) -> np.ndarray:
  """Every process's `value`, in process order (a blocking collective: all processes call it)."""
  if jax.process_count() == 1:
    return np.asarray([value], np.int64)
  out = multihost_utils.process_allgather(np.asarray([value], np.int32))
  return np.asarray(out, np.int64).reshape(-1)


def max_int(value: int) -> int:
  return int(gather_ints(value).max())


def any_true(flag: bool) -> bool:
  """Whether `flag` holds in any process (all processes call it; all get the same answer)."""
  return bool(max_int(int(bool(flag))))


def gather_texts(text: str) -> list[str]:
  """Every process's `text`, in process order (all processes call it)."""
  if jax.process_count() == 1:
    return [text]
  data = text.encode("utf-8")
  size = max_int(len(data)) + 1  # never an empty array
  mine = np.zeros((size,), np.uint8)
  mine[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, size)
  return [bytes(row).rstrip(b"\0").decode("utf-8") for row in rows]


def sum_counts(counts: Mapping[str, int]) -> dict[str, int]:
  """{key: count} summed over the processes (keys any process has); all processes call it."""
  if jax.process_count() == 1:
    return dict(counts)
  total = collections.Counter()
  for text in gather_texts(json.dumps(dict(counts), sort_keys=True)):
    total.update(json.loads(text))
  return dict(total)


def broadcast_text(text: str) -> str:
  """Process 0's `text` in every process (all processes call it)."""
  return gather_texts(text)[0]


def put_same(tree: Any, shardings: Any) -> Any:
  """jax.device_put of host values every process holds alike (a dVAE's weights, a pretrained
  file's parameters) onto shardings that may span processes.

  Given host values and a sharding over several processes, jax.device_put checks that every
  process passed the same value, with one collective per leaf: 113 of them for the tiny FLAVA's
  dVAE, about 12 s in a 2-process job on this machine. Here the whole tree is checked at once
  (a digest of its bytes, compared across processes: one collective) and each process places
  its own shards. A process holding other values fails in every process with the same error.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(leaf) for leaf in leaves]  # on the host once: digested, then sliced
  digest = hashlib.sha256()
  for leaf in leaves:
    digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  digests = gather_texts(digest.hexdigest())
  if len(set(digests)) > 1:
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    raise ValueError(f"process(es) {differ} hold other values than process 0 for the same "
                     f"{len(leaves)} arrays (a file that differs between hosts?)")
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = [shardings] * len(leaves)
  else:
    shardings = treedef.flatten_up_to(shardings)
  placed = [jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
            for x, s in zip(leaves, shardings)]
  return jax.tree.unflatten(treedef, placed)


def barrier(name: str) -> None:
  """Waits until every process got here (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopVotes:
  """Each step, every process's stop request as a vote the step's metrics carry home.

  `cast(code)` (0: carry on; >0: this process was asked to stop, e.g. by SIGTERM) starts a small
  max over all processes without waiting for it; `read(vote)` fetches the agreed code later,
  where the trainer fetches the step's metrics anyway (one step late), so that a stop costs
  the host no extra wait. Every process reads the same votes at the same steps, so all of them
  stop after the same step. With one process a vote is the code itself.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    if self.multi:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("processes",))
      self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self._max = jax.jit(lambda v: v.max(), out_shardings=replicated)

  def cast(self, code: int):
    if not self.multi:
      return int(code)
    local = np.full((jax.local_device_count(),), code, np.int32)
    return self._max(jax.make_array_from_process_local_data(self._sharding, local))

  def read(self, vote) -> int:
    return int(vote) if not self.multi else int(np.asarray(vote))
