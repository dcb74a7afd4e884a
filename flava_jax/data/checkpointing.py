"""The data iterators' states in an Orbax checkpoint, one file per process, elastic on restore.

    manager.save(step, args=ocp.args.Composite(data=DataSave(iterator), ...))
    manager.restore(step, args=ocp.args.Composite(data=DataRestore(iterator), ...))

Each process writes its own iterator's state as STEP/data/process_I-of-N.json (the layout of
grain's own handler, so checkpoints written by either restore with the other). On restore, a
process reads its own file when the job has the same number of processes and global batch; when
either changed, every process reads all N files and pipeline.carry_over_state turns them into its
own state (where each corpus's global order had got to).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from flava_jax.data import pipeline

_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def state_file(directory: epath.Path, index: int, count: int) -> epath.Path:
  return directory / f"process_{index}-of-{count}.json"


def saved_states(directory: epath.Path) -> list[dict]:
  """Every process's state in a checkpoint's data folder, in process order."""
  found = {}
  for path in directory.iterdir():
    match = _FILE.match(path.name)
    if match:
      found[int(match.group(1))] = (int(match.group(2)), path)
  counts = {count for count, _ in found.values()}
  if len(counts) != 1 or sorted(found) != list(range(counts.pop())):
    raise ValueError(f"{directory}: the data states are incomplete "
                     f"({sorted(p.name for _, p in found.values())})")
  return [json.loads(found[i][1].read_text()) for i in sorted(found)]


@dataclasses.dataclass
class Unreadable:
  """What DataHandler.restore returns when this process could not take its saved state."""

  error: Exception


class DataHandler(ocp.CheckpointHandler):
  """Orbax handler of a pipeline.DataIterator: see the module docstring."""

  def save(self, directory: epath.Path, args: "DataSave") -> None:
    state = json.dumps(args.item.get_state(), indent=1)
    state_file(directory, jax.process_index(), jax.process_count()).write_text(state)

  def restore(self, directory: epath.Path, args: "DataRestore") -> Any:
    """The iterator, set to its saved state; or Unreadable(error), so that a state one process
    cannot read does not stop it half way through Orbax's restore (the others would wait for it
    in Orbax's collectives): the trainer decides with every process what to do."""
    iterator = args.item
    try:
      own = state_file(directory, jax.process_index(), jax.process_count())
      state = json.loads(own.read_text()) if own.exists() else None
      if state is None or state.get("rows", iterator.rows) != iterator.rows:
        state = pipeline.carry_over_state(saved_states(directory), jax.process_index(),
                                          jax.process_count(), iterator.rows)
      iterator.set_state(state)
    except Exception as e:  # pylint: disable=broad-except  (a damaged file, a foreign state)
      return Unreadable(e)
    iterator.start_prefetch()
    return iterator

  def structure(self, directory: epath.Path) -> Any:
    del directory
    return None

  def metadata(self, directory: epath.Path) -> Any:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any
