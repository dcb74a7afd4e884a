"""Starting a run from earlier weights: `config.init`, whose fields the task names.

A task's WARM_STARTS table maps init fields to the parameter groups they load, e.g. FLAVA's
    init.model_from  every parameter (a converted model, a transformers directory, a workdir)
    init.image_from  image_encoder + mim_head (e.g. a MIM stage's workdir)
    init.text_from   text_encoder + mlm_head (e.g. an MLM stage's workdir)
and its FROZEN_STARTS name inputs it loads itself (FLAVA's init.dvae_from: the frozen dVAE: a
dVAE training workdir, a converted model holding one, or a transformers directory with a codebook).

A source is one of three kinds of directory, told apart by what it holds:
  - a training workdir (`checkpoints/`): the parameters of its newest checkpoint;
  - a flava_jax model directory (`flava_jax_model.json`, written by `python -m flava_jax.convert`);
  - a transformers save_pretrained directory (`config.json`), converted on the fly (FLAVA, BLIP,
    and Wav2Vec2Model, whose weights become the `audio_encoder` group of the audio tasks).
Every path is checked at start-up, before anything compiles; errors name the config field.
Parts are copied by name and must match the run's shapes exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flava_jax import checkpoint, convert, multihost

# A training workdir: checkpoints/STEP/state (Orbax) and the config it was trained with.
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
RUN_CONFIG = "run_config.json"

def init_sources(values: Mapping[str, Any], fields: tuple[str, ...],
                 frozen: tuple[str, ...] = (), whole: str = "model_from") -> dict[str, str]:
  """config.init parsed: {field: path} for the task's warm-start `fields` and `frozen` inputs;
  unknown fields, non-strings and missing or unrecognised directories fail naming the field.
  `whole` (every parameter) excludes the other parameter fields."""
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  fields = tuple(fields) + tuple(frozen)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join('init.' + u for u in unknown)}; this task's "
                     f"warm starts: {', '.join('init.' + f for f in fields)}")
  for name, path in values.items():
    if not isinstance(path, str):
      raise TypeError(f"init.{name} must be a string, got {path!r}")
  partial = [f for f in fields if f not in (whole, *frozen) and values.get(f)]
  if values.get(whole) and partial:
    raise ValueError(f"init.{whole} sets every parameter: leave "
                     f"{' and '.join('init.' + f for f in partial)} empty when it is given")
  for name, path in values.items():
    if path:
      source_kind(path, f"init.{name}")  # a missing or unrecognised directory fails here
  return {k: v for k, v in values.items() if v}


def source_kind(path: str, field: str) -> str:
  """'workdir', 'model' or 'transformers'; a clear error naming `field` otherwise."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{field}={path!r}: no such directory")
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    if not checkpoint_steps(path):
      raise FileNotFoundError(f"{field}={path!r}: the workdir has no finished checkpoint yet")
    return "workdir"
  if os.path.exists(os.path.join(path, checkpoint.MODEL_JSON)):
    return "model"
  if os.path.exists(os.path.join(path, "config.json")):
    return "transformers"
  raise FileNotFoundError(
      f"{field}={path!r} is neither a training workdir ({CHECKPOINT_DIR}/), a flava_jax model "
      f"directory ({checkpoint.MODEL_JSON}) nor a transformers directory (config.json)")


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps, newest first ([] without checkpoints/). Orbax writes unfinished
  ones under tmp names; set-aside ones (STEP.unreadable, STEP.diverged) are not bare numbers."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  steps = [int(n) for n in os.listdir(root)
           if n.isdigit() and os.path.isdir(os.path.join(root, n, STATE_ITEM))]
  return sorted(steps, reverse=True)


def _read_state_item(path: str) -> Any:
  """A checkpoint step's "state" item (CHECKPOINT_DIR/STEP/state, the trainer's StandardSave)
  as host numpy arrays, read without a target so that any device count reads what any wrote.

  The tree's structure comes from the item handler's own metadata (the item's _METADATA). A
  Checkpointer's metadata() would also look for step metadata (_CHECKPOINT_METADATA) inside the
  item directory, where the CheckpointManager never writes it (it sits one level up, beside the
  "state" and "data" items), and log "Metadata file does not exist" on every read.
  """
  handler = ocp.PyTreeCheckpointHandler()
  with ocp.Checkpointer(handler) as reader:
    metadata = handler.metadata(epath.Path(path))
    tree = getattr(metadata, "tree", metadata)  # a TreeMetadata; a plain tree in older Orbax
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def read_workdir_params(workdir: str, field: str) -> Any:
  """The parameters of a workdir's newest readable checkpoint, as host numpy arrays.

  Read without a target, so any device count can read what any other wrote.
  """
  return newest_readable_params(workdir, field)[0]


def newest_readable_params(workdir: str, field: str) -> tuple[Any, int, list[str]]:
  """(params, its step, notes on newer steps that could not be read) of a workdir."""
  notes = []
  for step in checkpoint_steps(workdir):
    path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), STATE_ITEM)
    try:
      return _read_state_item(path)["params"], step, notes
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
      notes.append(f"step {step} cannot be read ({type(e).__name__}: {' '.join(str(e).split())})")
  raise ValueError(f"{field}={workdir!r}: no readable checkpoint ({'; '.join(notes)})")


def _is_dvae_tree(params: Mapping) -> bool:
  return "encoder" in params and "image_encoder" not in params


def read_flava_params(path: str, field: str) -> Any:
  kind = source_kind(path, field)
  if kind == "workdir":
    params = read_workdir_params(path, field)
    if _is_dvae_tree(params):
      raise ValueError(f"{field}={path!r} is a dVAE workdir; use it as init.dvae_from")
    return params
  if kind == "model":
    loaded = checkpoint.load_model(path)
    return {"audio_encoder": loaded.params} if loaded.task == "audio" else loaded.params
  if model_type(path) == "wav2vec2":  # an audio encoder: the audio tasks' audio_encoder group
    from flava_jax import convert_audio  # pylint: disable=import-outside-toplevel
    try:
      return {"audio_encoder": convert_audio.from_transformers(path)[1]}
    except convert_audio.ConversionError as e:
      raise ValueError(f"{field}={path!r}: {e}") from None
  from flava_jax import convert_blip  # pylint: disable=import-outside-toplevel
  blip_sources = convert_blip.command_sources(path)
  if blip_sources:  # a BLIP transformers directory (retrieval, captioning or both)
    return convert_blip.from_transformers(**blip_sources)[1]
  return convert.from_transformers(path)[1]


def model_type(path: str) -> str:
  """A transformers directory's config.json model_type ("" when unreadable)."""
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      return str(json.load(f).get("model_type", ""))
  except (OSError, ValueError, AttributeError):
    return ""


def read_dvae_params(path: str, field: str = "init.dvae_from") -> Any:
  kind = source_kind(path, field)
  if kind == "workdir":
    params = read_workdir_params(path, field)
    if not _is_dvae_tree(params):
      raise ValueError(f"{field}={path!r} is a FLAVA workdir, not a dVAE one "
                       "(python -m flava_jax.main --config=configs/dvae.py writes those)")
    return params
  if kind == "model":
    loaded = checkpoint.load_model(path)
    if loaded.dvae_params is None:
      raise ValueError(f"{field}={path!r}: this model directory holds no dVAE")
    return loaded.dvae_params
  return convert.dvae_from_transformers(path)[1]


def replace_parts(target: Mapping, source: Mapping, parts: tuple[str, ...] | None, field: str,
                  notes: list[str] | None = None) -> tuple[dict, int]:
  """`target` with the leaves under `parts` (all when None) taken from `source`.

  Returns (new tree, number of leaves copied). Leaves keep the target's sharding. Missing
  leaves, extra leaves and shape differences are errors naming `field` and the leaf, except a
  ViT's position embeddings (`pos_embed`, [1 + g*g, D]) of another square grid: those are resized
  to this model's grid with PyTorch's bicubic interpolation ([CLS] kept), as the reference does
  when it fine-tunes at a higher resolution than it pretrained; `notes` gets a line for each.
  """
  flat_target, flat_source = convert.flatten_tree(target), convert.flatten_tree(source)
  wanted = [p for p in flat_target if parts is None or p[0] in parts]
  if parts is not None:
    absent = [part for part in parts if not any(p[0] == part for p in flat_source)]
    if absent:
      raise ValueError(f"{field}: the source has no {', '.join(absent)} parameters")
  missing = [p for p in wanted if p not in flat_source]
  extra = [p for p in flat_source if (parts is None or p[0] in parts) and p not in flat_target]
  if missing or extra:
    raise ValueError(f"{field}: parameters do not match this model: missing "
                     f"{['/'.join(p) for p in missing[:5]]}, unexpected "
                     f"{['/'.join(p) for p in extra[:5]]}")
  new = dict(flat_target)
  values = {}
  for p in wanted:
    old, value = flat_target[p], flat_source[p]
    if p[-1] == "pos_embed" and tuple(np.shape(value)) != tuple(old.shape):
      value = _resized_positions(value, old.shape, f"{field}: {'/'.join(p)}", notes)
    if tuple(np.shape(value)) != tuple(old.shape):
      raise ValueError(f"{field}: {'/'.join(p)} has shape {tuple(np.shape(value))} in the "
                       f"source and {tuple(old.shape)} in this model (config.model differs)")
    values[p] = np.asarray(value, dtype=old.dtype)
  targets = {p: getattr(flat_target[p], "sharding", None) for p in values}
  if all(t is not None for t in targets.values()):
    new.update(multihost.put_same(values, targets))  # one check that every process read the same
  else:
    new.update({p: jax.device_put(v, targets[p]) for p, v in values.items()})
  return _unflat(new), len(wanted)


def _resized_positions(value: Any, shape: tuple[int, ...], where: str,
                       notes: list[str] | None) -> Any:
  """Position embeddings [1 + a*a, D] resized to `shape` [1 + b*b, D] (bicubic), or `value`
  unchanged when either grid is not square or the widths differ (the caller then refuses it)."""
  from flava_jax.models.image import interpolate_positions  # pylint: disable=import-outside-toplevel
  have, want = np.shape(value), tuple(shape)
  if len(have) != 2 or len(want) != 2 or have[1] != want[1]:
    return value
  old, new = int(round((have[0] - 1) ** 0.5)), int(round((want[0] - 1) ** 0.5))
  if old * old != have[0] - 1 or new * new != want[0] - 1:
    return value
  if notes is not None:
    notes.append(f"{where} resized from a {old}x{old} to a {new}x{new} patch grid (bicubic)")
  return np.asarray(interpolate_positions(np.asarray(value, np.float32), new, new))


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def initial_params(params: Mapping, sources: Mapping[str, str],
                   warm_starts: Mapping[str, tuple[str, ...] | None]
                   ) -> tuple[dict, list[str]]:
  """Parameters after config.init: each field of `warm_starts` found in `sources` loads its
  parameter groups (None: every group the source has) in the table's order; the log lines."""
  notes = []
  for field, parts in warm_starts.items():
    path = sources.get(field)
    if not path:
      continue
    source = read_flava_params(path, f"init.{field}")
    resized: list[str] = []
    if parts is None:
      parts = tuple(k for k in params if k in source)  # e.g. a FlavaModel source has no heads
      params, n = replace_parts(params, source, parts, f"init.{field}", resized)
      kept = sorted(set(params) - set(parts))
      notes.append(f"{n} parameter arrays from {path}"
                   + (f" ({', '.join(kept)} not in the source: random)" if kept else ""))
    else:
      params, n = replace_parts(params, source, parts, f"init.{field}", resized)
      notes.append(f"{'/'.join(parts)} ({n} arrays) from {path}")
    notes += resized
  return params, notes
