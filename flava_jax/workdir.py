"""A training workdir: who may write it, what each start trained with, and checkpoints set aside.

    WORKDIR/
      .lock                 held (flock) by the one run writing this workdir; a dead run holds none
      run_config.json       the config of the newest start (what evaluate / warm starts read)
      run_configs/          every start's config: start-0001-step-0.json, start-0002-step-40.json
      checkpoints/STEP      Orbax checkpoints; unusable ones are renamed STEP.unreadable,
                            STEP.nonfinite (never deleted)
      metrics.jsonl, tensorboard/

Resuming compares the new config with the one the checkpoints were written under (the newest
start's). `RESUME_CHANGES` says which changes a resume accepts and what each does; every other
change stops the run at start-up naming the fields, as does any change that makes the checkpoint
impossible to restore (other shapes: `state_mismatch`).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import socket
from collections.abc import Mapping
from typing import Any

import jax

from flava_jax.warm_start import RUN_CONFIG

HISTORY_DIR = "run_configs"
LOCK_FILE = ".lock"

# Changes a resume accepts: field pattern -> what the change does. A field may match one pattern;
# the first one that matches wins. Fields matching none are refused (see `REFUSED_WHY`).
RESUME_CHANGES: tuple[tuple[str, str], ...] = (
    ("total_steps", "the run trains on to the new total; the learning-rate schedule is rebuilt "
                    "for it, so the rate of the resumed steps changes"),
    ("optimizer.learning_rate", "the learning-rate schedule is rebuilt from the resumed step"),
    ("optimizer.warmup_steps", "the learning-rate schedule is rebuilt from the resumed step"),
    ("optimizer.decay", "the learning-rate schedule is rebuilt from the resumed step"),
    ("optimizer.end_learning_rate_fraction", "the learning-rate schedule is rebuilt"),
    ("optimizer.weight_decay", "applies from the resumed step; Adam's moments carry over"),
    ("optimizer.b1", "applies from the resumed step; Adam's moments carry over"),
    ("optimizer.b2", "applies from the resumed step; Adam's moments carry over"),
    ("optimizer.eps", "applies from the resumed step; Adam's moments carry over"),
    ("optimizer.grad_clip_norm", "applies from the resumed step"),
    ("global_batch", "each step takes the new number of examples; the data continues from its "
                     "saved position and the schedule still counts steps"),
    ("grad_accum", "the same update in another number of micro-batches"),
    ("grad_cache", "contrastive micro-batches see the whole batch's negatives (True) or their "
                   "own (False) from here on"),
    ("log_every_steps", "progress lines at the new interval"),
    ("checkpoint.*", "checkpoints at the new interval / count"),
    ("evals", "the evaluations run as now configured"),
    ("evals.*", "the evaluations run as now configured"),
    ("sharding.*", "the checkpoint is resharded onto the new mesh and rules"),
    ("init.dvae_from", "the frozen dVAE is read again at every start: the resumed steps learn "
                       "the new one's codes as MIM/MMM targets"),
    ("init.*", "used only on a fresh start: ignored when resuming"),
    ("variant", "a label only"),
    ("model.dtype", "compute dtype only: the parameters are unchanged"),
    ("model.attention_impl", "attention kernel only: the parameters are unchanged"),
    ("model.remat_policy", "memory/compute trade-off only: the parameters are unchanged"),
    ("model.scan_unroll", "compilation only: the parameters are unchanged"),
    ("data.corpora.*.weight", "the mixture draws its corpora with the new weights from here on"),
    ("data.corpora.*.paths", "the corpus continues at its saved position in the new files (they "
                             "must hold the same examples in the same order)"),
    ("data.corpora.*.data_dir", "the corpus continues at its saved position in the new files"),
    ("data.read_threads", "input throughput only"),
    ("data.read_buffer_size", "input throughput only"),
    ("data.worker_buffer_size", "input throughput only"),
    ("data.fast_decode", "image decoding from here on"),
    ("data.max_pixels", "bad-input limits from here on"),
    ("data.max_text_bytes", "bad-input limits from here on"),
    ("data.max_consecutive_skips", "bad-input limits from here on"),
    ("data.cache_dir", "the embedded corpus is read from the new cache"),
    ("data.crop_*", "example processing from here on"),
    ("data.horizontal_flip", "example processing from here on"),
    ("data.mask_*", "masking from here on"),
    ("data.mlm_*", "masking from here on"),
    ("loss.*", "the objective changes from here on"),
)

REFUSED_WHY = {
    "task": "which model family the checkpoints hold",
    "model": "the parameters' shapes or meaning",
    "dvae": "the frozen tokenizer's codes (MIM/MMM targets)",
    "seed": "the data order and every step's random numbers",
    "data.worker_count": "the layout of the saved data-iterator state (one per worker)",
    "data.corpora": "which examples the saved data position refers to",
    "data.vocab_file": "the token ids the text parameters were trained on",
    "data.lowercase": "the token ids the text parameters were trained on",
    "optimizer.mu_dtype": "the optimizer state's dtype",
    "optimizer.trainable": "which parameters have optimizer state",
    "paired_text_length": "the caption length the model was trained on",
    "text_length": "the text length the model was trained on",
    "dvae_training": "the dVAE objective's schedule",
}


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked: one line naming the path or the fields."""


def prepare(workdir: str) -> str:
  """Creates the workdir if needed; a file, an unwritable or impossible path fails in one line."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir={workdir!r} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"workdir={workdir!r} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir={workdir!r} is not writable")
  return path


_HELD: set[str] = set()  # lock files this process holds


class Lock:
  """An exclusive lock on a workdir for the life of a run (process 0 of a job takes it).

  flock(2) on WORKDIR/.lock: the kernel releases it when the process ends however it ends, so a
  crashed or killed run never leaves it stuck. The file holds the owner's pid, host and start
  time, to name it when a second run is refused.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> "Lock":
    import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      if self.path in _HELD:  # flock may not refuse this process's own second lock
        raise OSError("held by this process")
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "another process"
      f.close()
      raise WorkdirError(f"workdir={os.path.dirname(self.path)!r} is in use by another run "
                         f"({owner}); wait for it to end or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    f.flush()
    self._file = f
    _HELD.add(self.path)
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the descriptor drops the flock
      self._file = None
      _HELD.discard(self.path)

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def config_dict(config: Any) -> dict:
  """A ConfigDict (or mapping) as plain JSON-able data, as run_config.json stores it."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def read_run_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}): the config the checkpoints were written "
                       "under is unknown; restore it or use another workdir") from None


def record_start(workdir: str, config: dict, step: int) -> str:
  """Writes this start's config to run_configs/ (kept for good) and to run_config.json."""
  history = os.path.join(workdir, HISTORY_DIR)
  os.makedirs(history, exist_ok=True)
  starts = [n for n in os.listdir(history) if n.startswith("start-") and n.endswith(".json")]
  if not starts and os.path.exists(os.path.join(workdir, RUN_CONFIG)):
    # A workdir from before the history: keep the config its first steps were trained with.
    _write_json(os.path.join(history, "start-0000-earlier.json"),
                read_run_config(workdir))
  number = len([n for n in starts if not n.startswith("start-0000")]) + 1
  path = os.path.join(history, f"start-{number:04d}-step-{step}.json")
  _write_json(path, config)
  _write_json(os.path.join(workdir, RUN_CONFIG), config)
  return path


def _write_json(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": leaf} of nested mappings; an empty mapping is a leaf ({})."""
  if isinstance(tree, Mapping) and tree:
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, before, after) of every field that differs; a missing side is None."""
  a, b = flatten(before), flatten(after)
  out = []
  for key in sorted(set(a) | set(b)):
    old, new = a.get(key), b.get(key)
    if _normal(old) == _normal(new):
      continue
    if all(v is None or v == {} for v in (old, new)) and _has_children(
        a if old is None else b, key):
      continue  # an empty section on one side, its fields on the other: those are the changes
    out.append((key, old, new))
  return out


def _has_children(flat: Mapping[str, Any], key: str) -> bool:
  return any(k.startswith(key + ".") for k in flat)


def _normal(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def effect(field: str) -> str | None:
  """What an accepted resume change does, or None where a resume refuses it."""
  for pattern, what in RESUME_CHANGES:
    if fnmatch.fnmatchcase(field, pattern):
      return what
  return None


def _refused_why(field: str) -> str:
  best = ""
  for prefix in REFUSED_WHY:
    if (field == prefix or field.startswith(prefix + ".")) and len(prefix) > len(best):
      best = prefix
  return REFUSED_WHY.get(best, "what the saved state means")


def _show(value: Any) -> str:
  text = json.dumps(value) if value is not None else "(absent)"
  return text if len(text) <= 60 else text[:57] + "..."


class ResumeRefused(WorkdirError):
  """The config differs from the checkpoints' in a way a resume cannot take."""


def check_resume(before: Mapping[str, Any], after: Mapping[str, Any], step: int,
                 workdir: str) -> list[str]:
  """Lines saying what each accepted change does; ResumeRefused naming every refused field."""
  refused, notes = [], []
  for field, old, new in changes(before, after):
    what = effect(field)
    if what is None and (old is None or new is None) and not field.startswith("data.corpora."):
      # A field one side's code did not have (the code changed between the starts): said, not
      # refused; if it changes the arrays, the restore's shape check still stops the run.
      what = ("a field the checkpoint's config did not have" if old is None else
              "a field this config no longer has") + " (the code changed since)"
    if what is None:
      refused.append(f"{field} {_show(old)} -> {_show(new)} (it sets {_refused_why(field)})")
    else:
      notes.append(f"{field} {_show(old)} -> {_show(new)}: {what}")
  if refused:
    raise ResumeRefused(
        f"cannot resume {workdir} from step {step} with another " + "; ".join(refused)
        + f". Set these fields back to the checkpoint's values (its config is "
        f"{os.path.join(workdir, RUN_CONFIG)}), or use a new workdir (e.g. warm-started with "
        f"--config.init.model_from={workdir})")
  return notes


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"params/a/b": (shape, dtype)} of a tree of arrays, ShapeDtypeStructs or Orbax metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not hasattr(leaf, "shape"):
      continue
    out["/".join(_key_name(k) for k in path)] = (tuple(leaf.shape), str(leaf.dtype))
  return out


def state_mismatch(saved: Any, expected: Any, limit: int = 4) -> list[str]:
  """How a checkpoint's array metadata differs from the state the config builds ([] if not)."""
  a, b = shapes_by_path(saved), shapes_by_path(expected)
  lines = []
  for path in sorted(set(a) | set(b)):
    if a.get(path) != b.get(path):
      old = "absent" if path not in a else f"{list(a[path][0])} {a[path][1]}"
      new = "absent" if path not in b else f"{list(b[path][0])} {b[path][1]}"
      lines.append(f"{path}: checkpoint {old}, config {new}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... {len(lines) - limit} more"]
  return lines


def set_aside(checkpoint_dir: str, step: int, why: str) -> str:
  """Renames checkpoints/STEP to STEP.WHY (STEP.WHY.2, ... if taken); returns the new path."""
  src = os.path.join(checkpoint_dir, str(step))
  dst, n = f"{src}.{why}", 1
  while os.path.exists(dst):
    n += 1
    dst = f"{src}.{why}.{n}"
  os.rename(src, dst)
  return dst

