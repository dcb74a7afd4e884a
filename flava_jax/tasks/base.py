"""The Task interface: what a model family gives the shared trainer, tools and evaluators.

A family is a model file (models/), a task file (tasks/) and a config (configs/). The trainer,
the data pipeline, the bench, the AOT tool and the evaluators know this interface, never a
family. A task owns the config sections that describe its model and objectives (`SECTIONS`,
parsed once in `__init__`) and answers:

  data       which corpus kinds it trains on (`kinds`), which batch kind's step each corpus
             kind feeds (`step_kind`), the per-example processors (`processors`), the arrays a
             step reads (`batch_spec`, `random_batch` for the bench)
  state      parameters (`init_params`, `logical_axes`), extra state carried in the train
             state and checkpoint (`init_extra`, `extra_logical_axes`: momentum copies, queues),
             frozen inputs given to every step but never trained (`init_frozen`: a tokenizer)
  step       the loss per kind (`loss`), what runs after each update (`after_update`), the
             weight-decay rule (`decays`), the parameter groups each kind's loss reaches
             (`groups_with_gradient`: the others get no AdamW update in that step), the split a
             contrastive kind offers to GradCache accumulation (`gradcache`)
  figures    analytic FLOPs per step (`step_flops`), start-up summary (`describe`)
  warm start parts a config field may load from another run (`WARM_STARTS`)
  evaluators functions on parameters (`predict`): image and text embeddings, pair scores, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a loss may need beyond its arrays: the mesh (for explicit collectives such as the
  global contrastive all-gather; None on one device), the rows per data-parallel shard of the
  (micro-)batch it sees, and the step being trained (a traced int: schedules such as the dVAE's
  temperature read it)."""

  mesh: Any
  local_batch: int
  step: Any = 0


@flax.struct.dataclass
class LossOutput:
  """A loss's result: the scalar to minimise, metrics (scalars) and an optional update of the
  extra state that `after_update` receives (e.g. momentum features to enqueue)."""

  loss: Array
  metrics: dict[str, Array]
  extra_update: Any = None


@dataclasses.dataclass(frozen=True)
class GradCacheSplit:
  """How a kind's loss splits for GradCache accumulation (tasks whose loss contrasts rows).

  embed(params, frozen, micro, rng, ctx) -> (embeddings, terms, metrics): one micro-batch's
      forward pass; `embeddings` (a pytree of [rows, ...] arrays) feed the batch-level loss,
      `terms` {name: (numerator, denominator)} are the row-decomposable losses (a weighted sum
      and its weight total, so that the whole batch's mean is sum(num) / sum(den)).
  contrast(params, embeddings, ctx) -> (loss, metrics): the batch-level loss over the
      embeddings of the whole batch (every negative), e.g. the global contrastive loss.
  weights: {term name: weight in the total loss}.
  """

  embed: Callable[..., tuple[Any, dict[str, tuple[Array, Array]], dict[str, Array]]]
  contrast: Callable[..., tuple[Array, dict[str, Array]]]
  weights: Mapping[str, float]


class Task:
  """Base class of every task; subclasses set NAME and SECTIONS and implement the abstract
  methods (those raising NotImplementedError)."""

  NAME: ClassVar[str] = ""
  # Config sections (dicts) and top-level scalar fields this task parses; the trainer owns the
  # rest (optimizer, data, checkpoint, sharding, evals, init and the run's scalars).
  SECTIONS: ClassVar[tuple[str, ...]] = ()
  SCALARS: ClassVar[Mapping[str, type]] = {}
  # config.init fields -> the top-level parameter groups they load (None: every group).
  WARM_STARTS: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"model_from": None}
  # config.init fields that load a frozen input instead -> the input's name in messages.
  FROZEN_STARTS: ClassVar[Mapping[str, str]] = {}

  def __init__(self, config: Mapping[str, Any]):
    """Parses this task's sections of `config` (errors name the field)."""
    raise NotImplementedError

  # --- data ---------------------------------------------------------------------------------

  @property
  def kinds(self) -> tuple[str, ...]:
    """Corpus kinds (data/preprocess.KINDS) this task can train on."""
    raise NotImplementedError

  def step_kind(self, corpus_kind: str) -> str:
    """The train step a corpus of this kind feeds (kinds sharing a step share one compile)."""
    return corpus_kind

  def step_kinds(self, corpus_kinds) -> tuple[str, ...]:
    """The distinct step kinds of these corpus kinds, in the order of the task's `kinds`."""
    present = set(corpus_kinds)
    return tuple(dict.fromkeys(self.step_kind(k) for k in self.kinds if k in present))

  def check_corpus(self, kind: str, where: str) -> None:
    if kind not in self.kinds:
      raise ValueError(f"{where}.kind={kind!r}: the {self.NAME} task trains on "
                       f"{', '.join(self.kinds)} corpora")

  def check(self, data_cfg: Any) -> None:
    """Start-up checks against the parsed data settings (data/pipeline.DataConfig), which the
    task keeps for what reads them later (random batches)."""
    self.data_cfg = data_cfg

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Callable]:
    """{corpus kind: per-example processor} for the data pipeline."""
    raise NotImplementedError

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays a `kind` step reads, as the pipeline ships them."""
    raise NotImplementedError

  def host_batch(self, kind: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a host batch the step reads (what is copied to the devices)."""
    keys = self.batch_spec(kind, 1)
    return {k: v for k, v in batch.items() if k in keys}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of random data with the step's shapes (the bench)."""
    raise NotImplementedError

  # --- state --------------------------------------------------------------------------------

  def init_params(self, rng: Array) -> Any:
    raise NotImplementedError

  def logical_axes(self) -> Any:
    """The parameters' logical axis names (a tree of PartitionSpecs)."""
    raise NotImplementedError

  def abstract_params(self) -> tuple[Any, Any]:
    """(the parameters' ShapeDtypeStructs, their logical axes). By default two traces of the
    model's init; a task whose init keeps the axes on its leaves gives both from one
    (`from_boxed`): a trace of a model costs seconds on a CPU."""
    return jax.eval_shape(self.init_params, jax.random.key(0)), self.logical_axes()

  def init_extra(self, rng: Array, params: Any) -> Any:
    """Extra train state (momentum copies, feature queues): carried and saved with the params."""
    del rng, params
    return {}

  def extra_logical_axes(self) -> Any:
    return {}

  def warm_started(self, params: Any, extra: Any) -> Any:
    """The extra state once a warm start (config.init) has replaced the parameters: momentum
    copies follow the loaded parameters (default: unchanged). Arrays keep their shardings and
    must not share buffers with `params` (the step donates both)."""
    del params
    return extra

  def init_frozen(self, seed: int, sources: Mapping[str, str], kinds) -> Any:
    """Frozen inputs of every step (host arrays; None when the kinds need none). `sources`:
    the config.init fields of FROZEN_STARTS."""
    del seed, sources, kinds
    return None

  def abstract_frozen(self) -> Any:
    return None

  def param_groups(self, params: Mapping[str, Any]) -> tuple[str, ...]:
    """Groups of parameters (optimizer.trainable, per-group Adam): top-level keys."""
    return tuple(params)

  def groups_with_gradient(self, kind: str, groups: tuple[str, ...]) -> tuple[str, ...]:
    """The groups a `kind` step's loss reaches; the others get no AdamW update in that step."""
    del kind
    return groups

  def decays(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (dict keys) gets weight decay."""
    raise NotImplementedError

  # --- the step -----------------------------------------------------------------------------

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    raise NotImplementedError

  def after_update(self, params: Any, extra: Any, extra_update: Any) -> tuple[Any, Any]:
    """What runs after each optimizer update (a clamp, an EMA, an enqueue)."""
    del extra_update
    return params, extra

  def gradcache(self, kind: str) -> GradCacheSplit | None:
    """The kind's loss split for GradCache accumulation; None: plain accumulation only."""
    del kind
    return None

  # --- figures ------------------------------------------------------------------------------

  def step_flops(self, kind: str, global_batch: int) -> float:
    """Analytic FLOPs of one train step of `kind` over the global batch (forward + backward)."""
    raise NotImplementedError

  def describe(self, params: Any) -> str:
    """The start-up line's model part."""
    del params
    return self.NAME

  # --- evaluators ---------------------------------------------------------------------------

  def predict(self) -> Any:
    """The functions evaluators call (None: this task has no evaluators)."""
    return None


def from_boxed(boxed: Any) -> tuple[Any, Any]:
  """Abstract parameters boxed with their logical axes -> (their ShapeDtypeStructs, the axes)."""
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
