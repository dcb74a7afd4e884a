"""FLAVA pretraining: the loop `python -m flava_jax.main` runs.

    train_and_evaluate(config, workdir) -> final metrics

One step = one batch from one corpus (the data mixture decides), through that kind's jitted,
donated train step. Metrics are fetched one step late (the host never waits for the device),
written as progress lines, to WORKDIR/metrics.jsonl and to TensorBoard event files. The train
state, the data iterator's state and the step go into one Orbax checkpoint every
`checkpoint.every_steps` and at the end; starting again with the same workdir resumes exactly
(the step rng is folded from the seed and the step). SIGTERM (TPU preemption) saves and exits.
A NaN/Inf loss stops the run naming the step and the loss; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from flava_jax import binary, evals, evaluate, flops, sharding, train, warm_start
from flava_jax.model_summary import num_parameters
from flava_jax.data import pipeline
from flava_jax.losses.flava import LossConfig
from flava_jax.models.config import DVAEConfig, FlavaConfig, dataclass_from_dict, dvae_view_size
from flava_jax.models.dvae import DVAE, init_dvae_params
from flava_jax.models.flava import FlavaModel, init_params

CHECKPOINT_DIR = warm_start.CHECKPOINT_DIR
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = warm_start.RUN_CONFIG


class NonFiniteLoss(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 1000
  keep: int = 3
  async_save: bool = True


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (notebooks): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricWriter:
  """Progress lines on stdout, WORKDIR/metrics.jsonl and TensorBoard events (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int):
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")
    self._start = time.time()
    self._start_step = None

  def write(self, step: int, metrics: dict[str, float], progress: bool = True) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if progress:
      if self._start_step is None:
        self._start_step, self._start = step, time.time()
      done = step - self._start_step
      eta = (time.time() - self._start) / done * (self.total_steps - step) if done > 0 else 0
      shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                       if k.endswith("loss") or k in ("examples_per_s", "mfu", "learning_rate"))
      print(f"step {step}/{self.total_steps} {shown} eta {eta:.0f}s", flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


# Top-level fields of a training config; sections are checked by their own dataclasses.
_SCALARS = dict(variant=str, seed=int, global_batch=int, paired_text_length=int,
                text_length=int, total_steps=int, log_every_steps=int, grad_accum=int)


def check_fields(config: Any, sections: tuple[str, ...]) -> None:
  """Unknown top-level fields and ill-typed or non-positive scalars fail by name."""
  known = set(_SCALARS) | set(sections)
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {', '.join(unknown)}; known fields: "
                     f"{', '.join(sorted(known))}")
  missing = sorted(set(sections) - set(config.keys()))
  if missing:
    raise ValueError(f"config has no {', '.join(missing)} section")
  for name, kind in _SCALARS.items():
    if name not in config:
      continue
    value = config[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
      raise TypeError(f"config.{name} must be an int, got {value!r}")
    if kind is str and not isinstance(value, str):
      raise TypeError(f"config.{name} must be a string, got {value!r}")
  for name in ("global_batch", "total_steps", "log_every_steps", "text_length",
               "paired_text_length"):
    if name in config and config[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if config.get("grad_accum", 1) < 1:
    raise ValueError(f"config.grad_accum must be >= 1, got {config.grad_accum}")


FLAVA_SECTIONS = ("model", "dvae", "checkpoint", "evals", "loss", "optimizer", "data", "sharding",
                  "init")


def check_config(config: Any) -> None:
  """Every start-up check of a FLAVA training config that needs no data read and no compile:
  field names and types of every section, init paths, the mesh and the batch split. Errors
  name the field."""
  check_fields(config, FLAVA_SECTIONS)
  model_cfg = FlavaConfig.from_dict(config.model)
  DVAEConfig.from_dict(config.dvae)
  check_prediction_slots(dataclass_from_dict(LossConfig, config.loss, "loss"), model_cfg,
                         config)
  optimizer_cfg = dataclass_from_dict(train.OptimizerConfig, config.optimizer, "optimizer")
  if optimizer_cfg.trainable:
    groups = jax.eval_shape(lambda: init_params(FlavaModel(model_cfg), jax.random.key(0)))
    train.check_trainable(optimizer_cfg.trainable, groups)
  dataclass_from_dict(CheckpointConfig, config.checkpoint, "checkpoint")
  for name, task in config.evals.items():
    evals.parse(task, f"evals.{name}")
  dataclass_from_dict(warm_start.InitConfig, config.init, "init")
  pipeline.data_config(config.data)
  check_batch(config, sharding.make_mesh(config.sharding.mesh))


def check_prediction_slots(loss: LossConfig, model: FlavaConfig, config: Any) -> None:
  """The heads' prediction slots must hold every label the data pipeline makes."""
  patches = model.image.num_patches
  masked = min(config.data.mask_patches, patches)
  slots = loss.image_prediction_slots
  if slots and not masked <= slots <= patches:
    raise ValueError(f"loss.image_prediction_slots={slots} must be 0 (every patch) or between "
                     f"data.mask_patches={masked} and the {patches} patches of an image")
  for name, length_name in (("paired_text_prediction_slots", "paired_text_length"),
                            ("text_prediction_slots", "text_length")):
    slots, length = getattr(loss, name), config[length_name]
    if slots > length:
      raise ValueError(f"loss.{name}={slots} exceeds {length_name}={length}")


def init_key(seed: int) -> jax.Array:
  """The key parameters are initialised from. RBG rather than threefry: the same values run to
  run, and XLA compiles the initialiser 2-3x faster on CPU (threefry's unrolled rounds)."""
  return jax.random.key(seed, impl="rbg")


def _dvae_params(dvae: DVAE, image_size: int, source: str, seed: int) -> Any:
  """The frozen tokenizer's encoder: from init.dvae_from, else randomly initialised."""
  if not source:
    return init_dvae_params(dvae, jax.random.fold_in(init_key(seed), 1), image_size=image_size)
  abstract = jax.eval_shape(lambda: init_dvae_params(dvae, jax.random.key(0),
                                                     image_size=image_size))
  abstract = {"encoder": abstract["encoder"]}  # FLAVA training reads the codes only
  params, _ = warm_start.replace_parts(abstract, warm_start.read_dvae_params(source),
                                       ("encoder",), "init.dvae_from")
  return params


def check_batch(config: Any, mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if config.global_batch % dp:
    raise ValueError(f"global_batch={config.global_batch} is not divisible by the data-parallel "
                     f"size {dp} (mesh {dict(mesh.shape)})")
  accum = config.get("grad_accum", 1)
  if (config.global_batch // dp) % accum:
    raise ValueError(f"grad_accum={accum} does not divide the {config.global_batch // dp} rows "
                     f"each of the {dp} data-parallel shards holds (global_batch="
                     f"{config.global_batch})")


def _manager(workdir: str, cfg: CheckpointConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep,
                                         enable_async_checkpointing=cfg.async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options)


def _restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                    data: pipeline.DataIterator) -> tuple[Any, int] | None:
  """The newest readable checkpoint (falling back to older ones with a warning), or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data)))
      return restored["state"], step
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
      logging.warning("checkpoint at step %d cannot be restored (%s: %s); trying an older one",
                      step, type(e).__name__, e)
      print(f"warning: checkpoint at step {step} cannot be restored ({type(e).__name__}); "
            "trying an older one", flush=True)
  return None


def save_run_config(config: Any, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RUN_CONFIG), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(dict(config), indent=2, default=str))


def _warn_if_dvae_changed(workdir: str, dvae_from: str) -> None:
  """The frozen dVAE is not part of the checkpoint: a resumed run must name the same one."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      before = json.load(f).get("init", {}).get("dvae_from", "")
  except (OSError, ValueError):
    return
  if before != dvae_from:
    print(f"warning: this workdir was trained with init.dvae_from={before!r}, now "
          f"{dvae_from!r}: resumed steps will learn other MIM/MMM targets", flush=True)


@dataclasses.dataclass
class Run:
  """What the step loop needs: a sharded state, one jitted step per batch kind, the data."""

  config: Any
  workdir: str
  mesh: Any
  data: pipeline.DataIterator
  state: Any                      # its shapes and shardings are what checkpoints restore into
  steps: dict[str, Any]           # kind -> step(state, batch, rng) -> (state, metrics)
  step_flops: dict[str, float]    # kind -> FLOPs of one step at the global batch
  schedule: Any
  checkpoint: CheckpointConfig
  rng: Any
  on_fresh_start: Any = None      # state -> state, when no checkpoint is resumed (config.init)
  host_batch: Any = None          # host batch -> the part the steps read (before the transfer)
  evaluate: Any = None            # Evaluations: the evals due at a step, on the current params


def run_loop(run: Run, stop_after: int | None = None) -> tuple[Any, int, bool]:
  """Resumes, trains to config.total_steps (or stop_after more steps), checkpoints.

  Returns (state, step reached, stopped early).
  """
  config, data = run.config, run.data
  manager = _manager(run.workdir, run.checkpoint)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          run.state)
  restored = _restore_latest(manager, abstract, data)
  state = run.state
  if restored is not None:
    state, start = restored
    print(f"resumed from step {start} in {run.workdir}", flush=True)
  elif run.on_fresh_start is not None:
    state = run.on_fresh_start(state)
  peak = flops.peak_flops_per_device(jax.devices()[0])
  writer = MetricWriter(run.workdir, config.total_steps)
  step_rng = jax.random.fold_in(run.rng, 2)
  first = int(jax.device_get(state.step))
  stop_at = config.total_steps if stop_after is None else min(first + stop_after,
                                                               config.total_steps)
  pending = None  # (step, corpus, device metrics, start time) fetched one step late

  def flush(pending_item, now):
    step, corpus, metrics, started = pending_item
    host = jax.device_get(metrics)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLoss(f"step {step}: {corpus} loss is {loss} "
                          f"({ {k: float(v) for k, v in host.items()} }); the last good "
                          "checkpoint is kept")
    if step % config.log_every_steps == 0 or step == config.total_steps:
      seconds = max(now - started, 1e-9)
      kind = data.kinds[corpus]
      out = {f"{corpus}/{k}": float(v) for k, v in host.items()}
      out.update(examples_per_s=config.global_batch / seconds,
                 learning_rate=float(run.schedule(step - 1)),
                 tflops_per_device=run.step_flops[kind] / seconds / jax.device_count() / 1e12)
      if peak:
        out["mfu"] = run.step_flops[kind] / seconds / jax.device_count() / peak
      out.update({f"skipped/{k}": v for k, v in data.skipped.items()})
      writer.write(step, out)

  stopped = False
  with _Preemption() as preemption:
    step = first
    while step < config.total_steps:
      corpus, batch = next(data)
      if run.host_batch is not None:
        batch = run.host_batch(batch)
      started = time.time()
      state, metrics = run.steps[data.kinds[corpus]](state, pipeline.to_global(batch, run.mesh),
                                                     step_rng)
      step += 1
      if pending is not None:
        flush(pending, started)
      pending = (step, corpus, metrics, started)
      stopping = preemption.requested or step == stop_at
      if step % run.checkpoint.every_steps == 0 or step == config.total_steps or stopping:
        flush(pending, time.time())
        pending = None
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data)),
            force=True)
        if jax.process_index() == 0:
          print(f"checkpoint {step} saving", flush=True)
      if run.evaluate is not None and step < config.total_steps:
        if pending is not None and run.evaluate.due(step):
          flush(pending, time.time())  # before the evaluation, which is not step time
          pending = None
        results = run.evaluate(step, state.params)
        if results:
          writer.write(step, results, progress=False)
      if stopping and step < config.total_steps:
        why = "SIGTERM" if preemption.requested else "stop_after"
        manager.wait_until_finished()
        print(f"{why}: saved step {step} and stopped", flush=True)
        stopped = True
        break
  # The last step always checkpoints, which flushes its metrics.
  manager.wait_until_finished()
  manager.close()
  data.close()
  writer.close()
  return state, step, stopped


def write_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
  writer = MetricWriter(workdir, step)
  writer.write(step, metrics, progress=False)
  writer.close()


def run_binary(argv, check, train_fn) -> None:
  """The body of both binaries (flava_jax.main, flava_jax.train_dvae): joins the other processes
  when --multiprocess, logs the topology, stops with a one-line usage error on a bad config,
  then trains with --config and --workdir."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel,g-multiple-import
  binary.start(argv)
  try:
    check(flags.FLAGS.config)
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise app.UsageError(f"bad config: {e}") from None
  train_fn(flags.FLAGS.config, flags.FLAGS.workdir)


class Evaluations:
  """A run's evaluators by name (config.evals): `due(step)`, and `(step, params)` ->
  {"eval/NAME/metric": value} of those due at that step (all of them when final)."""

  def __init__(self, evaluators: dict[str, Any]):
    self.evaluators = evaluators

  @staticmethod
  def _due(evaluator: Any, step: int) -> bool:
    every = evaluator.cfg.every_steps
    return bool(every) and step % every == 0

  def due(self, step: int) -> bool:
    return any(self._due(e, step) for e in self.evaluators.values())

  def __call__(self, step: int, params: Any, final: bool = False) -> dict[str, float]:
    out = {}
    for name, evaluator in self.evaluators.items():
      if final or self._due(evaluator, step):
        metrics = evaluator(params)
        if jax.process_index() == 0:
          print(f"step {step} " + evaluate.format_metrics(f"eval {name}", metrics), flush=True)
        out.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
    return out


def make_evaluations(config: Any, model: FlavaModel, mesh, rules) -> Evaluations:
  """config.evals built, their splits opened and checked."""
  if not config.evals:
    return Evaluations({})
  data_cfg, _ = pipeline.data_config(config.data)
  ctx = evaluate.make_context(model.config, mesh, rules, data_cfg.vocab_file,
                              config.paired_text_length, data_cfg.cache_dir)
  return Evaluations({name: evals.build(task, ctx, f"evals.{name}")
                      for name, task in config.evals.items()})


def train_and_evaluate(config: Any, workdir: str, stop_after: int | None = None
                       ) -> dict[str, Any]:
  """Trains for config.total_steps (resuming from workdir), then evaluates; returns metrics.

  stop_after: save a checkpoint and return after this many steps of this call (as a preempted
  run does); a later call with the same workdir carries on.
  """
  check_config(config)
  mesh = sharding.make_mesh(config.sharding.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = FlavaModel(FlavaConfig.from_dict(config.model))
  dvae = DVAE(DVAEConfig.from_dict(config.dvae))
  loss_cfg = dataclass_from_dict(LossConfig, config.loss, "loss")
  optimizer_cfg = dataclass_from_dict(train.OptimizerConfig, config.optimizer, "optimizer")
  ckpt_cfg = dataclass_from_dict(CheckpointConfig, config.checkpoint, "checkpoint")
  init_cfg = dataclass_from_dict(warm_start.InitConfig, config.init, "init")  # paths checked
  tx = train.make_optimizer(optimizer_cfg, config.total_steps)
  data = pipeline.make_pipeline(config)  # start-up errors of the data come before any compile
  evaluations = make_evaluations(config, model, mesh, rules)  # and of the held-out splits
  _warn_if_dvae_changed(workdir, init_cfg.dvae_from)
  save_run_config(config, workdir)

  rng = jax.random.key(config.seed)
  state, shardings = train.create_train_state(model, tx, init_key(config.seed), mesh, rules)
  dvae_params = None  # text-only runs (the MLM stage) never tokenise images
  if set(data.kinds.values()) & {"image", "paired"}:
    dvae_params = _dvae_params(dvae, dvae_view_size(model.config.image, dvae.config),
                               init_cfg.dvae_from, config.seed)
  if jax.process_index() == 0:
    print(f"FLAVA {config.get('variant', '')}: {num_parameters(state.params):,} parameters; "
          f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); corpora {data.kinds}; global batch {config.global_batch}"
          + (f" in {config.grad_accum} micro-batches" if config.get("grad_accum", 1) > 1
             else "")
          + ("" if dvae_params is None else f"; dVAE from {init_cfg.dvae_from}"
             if init_cfg.dvae_from else "; dVAE random (init.dvae_from not set)"), flush=True)

  def fresh_start(state):
    params, notes = warm_start.initial_params(state.params, init_cfg)
    for note in notes:
      print(f"init: {note}", flush=True)
    return state.replace(params=params)

  local_batch = config.global_batch // sharding.data_parallel_size(mesh)
  steps = {}
  for kind in sorted(set(data.kinds.values())):
    step_fn = train.make_train_step(model, dvae, tx, loss_cfg, mesh, rules, kind, shardings,
                                    local_batch, config.get("grad_accum", 1))
    steps[kind] = functools.partial(lambda f, s, b, r: f(s, dvae_params, b, r), step_fn)
  step_flops = {kind: flops.config_step_flops(config, kind) for kind in steps}
  run = Run(config=config, workdir=workdir, mesh=mesh, data=data, state=state, steps=steps,
            step_flops=step_flops,
            schedule=train.learning_rate_schedule(optimizer_cfg, config.total_steps),
            checkpoint=ckpt_cfg, rng=rng, on_fresh_start=fresh_start,
            evaluate=evaluations)
  state, step, stopped = run_loop(run, stop_after)
  if stopped:
    return {"stopped_at": step, "state": state}
  results = evaluations(step, state.params, final=True)
  if results:
    write_metrics(workdir, step, results)
  results["state"] = state
  return results
