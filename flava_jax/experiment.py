"""A training config parsed once, and what every user of it builds the same way.

    exp = Experiment(config)           # parse: the task's sections and the trainer's, typed
    state = exp.create_state()         # sharded train state (params, Adam, extra state)
    step = exp.train_step("paired")    # jitted, donated step; step(state, exp.frozen(), batch, rng)
    data = exp.pipeline()              # the input pipeline of config.data

The trainer, the bench, the AOT tool and the tests set up runs through this one class: config ->
task (tasks/), typed sections (`RunConfig`), mesh and logical rules, optimizer, sharded state,
jitted steps. Start-up errors name the config field; nothing below re-reads the raw config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from flava_jax import multihost, sharding, tasks, train, warm_start
from flava_jax.data import pipeline
from flava_jax.parse import as_dict, dataclass_from_dict

# The trainer's top-level fields (the task adds its own: tasks.Task.SECTIONS and SCALARS).
SCALARS = dict(task=str, variant=str, seed=int, global_batch=int, total_steps=int,
               log_every_steps=int, grad_accum=int, grad_cache=bool)
SECTIONS = ("checkpoint", "evals", "optimizer", "data", "sharding", "init")
POSITIVE = ("global_batch", "total_steps", "log_every_steps")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 1000
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The trainer's typed view of a config (the task parses its own sections)."""

  task: str
  variant: str
  seed: int
  global_batch: int
  total_steps: int
  log_every_steps: int
  grad_accum: int
  grad_cache: bool
  optimizer: train.OptimizerConfig
  checkpoint: CheckpointConfig
  data: pipeline.DataConfig
  corpora: dict          # name -> pipeline.CorpusConfig
  mesh: dict             # sharding.mesh
  rules: sharding.Rules
  init: dict             # init field -> path (the non-empty ones)
  evals: dict            # name -> evaluator Config (flava_jax/evals)
  raw: dict              # the whole config as plain data (the workdir keeps it)

  def to_json(self) -> str:
    return json.dumps(self.raw, sort_keys=True)


def check_fields(config: Mapping[str, Any], task_cls: type[tasks.Task]) -> None:
  """Unknown top-level fields and ill-typed or non-positive scalars fail by name."""
  scalars = dict(SCALARS, **task_cls.SCALARS)
  sections = SECTIONS + task_cls.SECTIONS
  known = set(scalars) | set(sections)
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {', '.join(unknown)}; known fields of a "
                     f"{task_cls.NAME} config: {', '.join(sorted(known))}")
  missing = sorted(set(sections) - set(config.keys()) - {"init", "evals"})
  if missing:
    raise ValueError(f"config has no {', '.join(missing)} section")
  for name, kind in scalars.items():
    if name not in config:
      continue
    value = config[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
      raise TypeError(f"config.{name} must be an int, got {value!r}")
    if kind is bool and not isinstance(value, bool):
      raise TypeError(f"config.{name} must be a bool, got {value!r}")
    if kind is str and not isinstance(value, str):
      raise TypeError(f"config.{name} must be a string, got {value!r}")
  for name in POSITIVE + tuple(n for n, k in task_cls.SCALARS.items() if k is int):
    if name in config and config[name] <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if config.get("grad_accum", 1) < 1:
    raise ValueError(f"config.grad_accum must be >= 1, got {config['grad_accum']}")


def parse(config: Mapping[str, Any]) -> tuple[RunConfig, tasks.Task]:
  """The config's typed sections and its task; every start-up check that needs no data read and
  no compile (field names and types, corpus kinds, init paths, the mesh and the batch split)."""
  from flava_jax import evals  # pylint: disable=import-outside-toplevel  (evals import tasks' users)
  task_cls = tasks.task_class(tasks.task_name(config))
  check_fields(config, task_cls)
  task = task_cls(config)
  data_cfg, corpora = pipeline.data_config(config["data"])
  for name, corpus in corpora.items():
    task.check_corpus(corpus.kind, f"data.corpora.{name}")
  task.check(data_cfg)
  optimizer = dataclass_from_dict(train.OptimizerConfig, config["optimizer"], "optimizer")
  evaluators = {name: evals.parse(values, f"evals.{name}")
                for name, values in as_dict(config.get("evals") or {}).items()}
  init = warm_start.init_sources(config.get("init") or {}, tuple(task_cls.WARM_STARTS),
                                 tuple(task_cls.FROZEN_STARTS))
  run = RunConfig(
      task=task_cls.NAME, variant=config.get("variant", ""), seed=config.get("seed", 0),
      global_batch=config["global_batch"], total_steps=config["total_steps"],
      log_every_steps=config.get("log_every_steps", 100),
      grad_accum=config.get("grad_accum", 1), grad_cache=config.get("grad_cache", False),
      optimizer=optimizer,
      checkpoint=dataclass_from_dict(CheckpointConfig, config["checkpoint"], "checkpoint"),
      data=data_cfg, corpora=corpora, mesh=dict(as_dict(config["sharding"]["mesh"])),
      rules=sharding.rules_from_config(config["sharding"]["rules"]), init=init,
      evals=evaluators, raw=json.loads(json.dumps(as_dict(config), default=list)))
  if run.grad_cache and run.grad_accum > 1 and not any(
      task.gradcache(task.step_kind(c.kind)) for c in corpora.values()):
    raise ValueError("config.grad_cache=True, but no batch kind of this run's corpora has a "
                     "GradCache split (the contrastive ones do)")
  return run, task


def init_key(seed: int) -> jax.Array:
  """The key parameters are initialised from. RBG rather than threefry: the same values run to
  run, and XLA compiles the initialiser 2-3x faster on CPU (threefry's unrolled rounds)."""
  return jax.random.key(seed, impl="rbg")


class Experiment:
  """A config's task, typed settings, mesh, rules and optimizer, and what is built from them."""

  def __init__(self, config: Any, devices: Sequence[Any] | None = None,
               parsed: tuple[RunConfig, tasks.Task] | None = None):
    self.run, self.task = parsed or parse(config)
    self.devices = list(devices) if devices is not None else jax.devices()
    self.mesh = sharding.make_mesh(self.run.mesh, self.devices)
    self.rules = self.run.rules
    self.check_batch(self.run.global_batch)
    # One trace of the model's init gives the parameters' shapes, groups and axes; the state's
    # shapes and shardings follow from them (a trace costs seconds on a CPU: once per process).
    self._param_shapes, self._axes = self.task.abstract_params()
    self._groups = self.task.param_groups(self._param_shapes)
    train.check_trainable(self.run.optimizer.trainable, self._groups)
    self.tx = train.make_optimizer(self.run.optimizer, self.run.total_steps, self.task.decays,
                                   self._groups)
    self._abstract = None

  # --- sizes --------------------------------------------------------------------------------

  @property
  def data_parallel(self) -> int:
    return sharding.data_parallel_size(self.mesh)

  def check_batch(self, global_batch: int) -> None:
    dp, accum = self.data_parallel, self.run.grad_accum
    if global_batch % dp:
      raise ValueError(f"global_batch={global_batch} is not divisible by the data-parallel "
                       f"size {dp} (mesh {dict(self.mesh.shape)})")
    if (global_batch // dp) % accum:
      raise ValueError(f"grad_accum={accum} does not divide the {global_batch // dp} rows "
                       f"each of the {dp} data-parallel shards holds (global_batch="
                       f"{global_batch})")

  def groups(self) -> tuple[str, ...]:
    """The parameters' groups (the task's top-level keys): one Adam state each."""
    return self._groups

  # --- state --------------------------------------------------------------------------------

  def _init(self, rng: jax.Array) -> tuple[Any, Any]:
    params = self.task.init_params(rng)
    return params, self.task.init_extra(jax.random.fold_in(rng, 1), params)

  def param_shardings(self) -> Any:
    return sharding.logical_to_shardings(self._axes, self.mesh, self.rules)

  def extra_shardings(self) -> Any:
    return sharding.logical_to_shardings(self.task.extra_logical_axes(), self.mesh, self.rules)

  def abstract_state(self) -> tuple[train.TrainState, Any]:
    """(the state as ShapeDtypeStructs with their shardings, the shardings)."""
    if self._abstract is None:
      shapes = train.state_shapes(self._param_shapes, self.task.init_extra, self.tx,
                                  init_key(self.run.seed))
      self._abstract = train.abstract_state(shapes, self.param_shardings(),
                                            self.extra_shardings(), self.mesh)
    return self._abstract

  def create_state(self, rng: jax.Array | None = None) -> train.TrainState:
    """A randomly initialised state (from the config's seed), created sharded."""
    rng = init_key(self.run.seed) if rng is None else rng
    shardings = self.state_shardings  # the abstract state's: no second trace of the axes
    state, _ = train.create_state(self._init, self.tx, shardings.params, shardings.extra,
                                  self.mesh, rng, self.rules, shardings=shardings)
    return state

  @property
  def state_shardings(self) -> Any:
    return self.abstract_state()[1]

  def frozen(self, kinds: Sequence[str] | None = None) -> Any:
    """The task's frozen step inputs, replicated on the mesh (None where the kinds need none)."""
    kinds = tuple(c.kind for c in self.run.corpora.values()) if kinds is None else kinds
    frozen = self.task.init_frozen(self.run.seed, self.run.init, kinds)
    if frozen is None:
      return None
    return multihost.put_same(frozen, sharding.replicated(self.mesh))

  def abstract_frozen(self) -> Any:
    replicated = sharding.replicated(self.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        self.task.abstract_frozen())

  # --- steps --------------------------------------------------------------------------------

  def keep_groups(self, kind: str) -> tuple[str, ...]:
    """Groups a `kind` step leaves untouched: not trainable, or out of the loss's reach."""
    groups = self.groups()
    reached = set(self.task.groups_with_gradient(kind, groups))
    trainable = set(self.run.optimizer.trainable or groups)
    return tuple(g for g in groups if g not in reached or g not in trainable)

  def train_step(self, kind: str, global_batch: int | None = None,
                 grad_accum: int | None = None, grad_cache: bool | None = None,
                 compiler_options: dict[str, Any] | None = None):
    """The jitted, donated step of batch kind `kind` (a step kind: task.step_kind)."""
    global_batch = global_batch or self.run.global_batch
    return train.make_train_step(
        self.task, kind, self.tx, self.mesh, self.rules, self.state_shardings,
        local_batch=global_batch // self.data_parallel,
        grad_accum=self.run.grad_accum if grad_accum is None else grad_accum,
        grad_cache=self.run.grad_cache if grad_cache is None else grad_cache,
        keep=self.keep_groups(kind), compiler_options=compiler_options)

  def abstract_batch(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    batch_sharding = sharding.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
            for k, v in self.task.batch_spec(kind, rows).items()}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, jax.Array]:
    return jax.device_put(self.task.random_batch(kind, rows, seed),
                          sharding.batch_sharding(self.mesh))

  def step_kinds(self) -> tuple[str, ...]:
    return self.task.step_kinds(c.kind for c in self.run.corpora.values())

  def step_flops(self, kind: str, global_batch: int | None = None) -> float:
    return self.task.step_flops(kind, global_batch or self.run.global_batch)

  # --- data ---------------------------------------------------------------------------------

  def pipeline(self, process_index: int | None = None, process_count: int | None = None
               ) -> pipeline.DataIterator:
    return _pipeline(self.run, self.task, process_index, process_count)


def make_pipeline(config: Any, process_index: int | None = None,
                  process_count: int | None = None) -> pipeline.DataIterator:
  """The input pipeline of a training config (parsed; no mesh, no state)."""
  return _pipeline(*parse(config), process_index, process_count)


def _pipeline(run: RunConfig, task: tasks.Task, process_index: int | None,
              process_count: int | None) -> pipeline.DataIterator:
  """config.data's corpora, each read through the task's processor of its kind."""
  kinds = {c.kind for c in run.corpora.values()}
  return pipeline.make_pipeline(run.data, run.corpora, task.processors(run.data, kinds),
                                run.global_batch, run.seed, process_index, process_count)
