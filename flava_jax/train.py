"""Train state, optimizer and the sharded, donated train step (one per batch kind).

    mesh = sharding.make_mesh(config.sharding.mesh)
    rules = sharding.rules_from_config(config.sharding.rules)
    state, state_shardings = create_train_state(model, tx, rng, mesh, rules)
    step = make_train_step(model, dvae, tx, loss_config, mesh, rules, "paired", state_shardings,
                           local_batch=global_batch // sharding.data_parallel_size(mesh))
    state, metrics = step(state, dvae_params, batch, rng)

The state is created already sharded (eval_shape, then jit with out_shardings); the frozen dVAE is
an input of the step, never part of the optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flava_jax import sharding
from flava_jax.data.transforms import model_pixels
from flava_jax.losses import flava as flava_losses
from flava_jax.models.config import check_choice, dataclass_from_dict
from flava_jax.models.dvae import DVAE
from flava_jax.models.flava import LOGIT_SCALE_MAX, FlavaModel, init_params, logical_axes

Array = jax.Array

# Leaves that get weight decay: weight matrices, conv kernels and embedding tables. Biases,
# LayerNorm scales, [CLS]/[MASK] tokens and the logit scale do not.
DECAYED_LEAVES = frozenset({"kernel", "qkv_kernel", "out_kernel", "patch_kernel", "word_embed",
                            "position_embed", "token_type_embed", "pos_embed"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then cosine (or linear) decay, as FLAVA trains."""

  learning_rate: float = 1e-3
  warmup_steps: int = 10_000
  decay: str = "cosine"  # cosine | linear | constant
  end_learning_rate_fraction: float = 0.0
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 0.0  # 0 disables
  mu_dtype: str = "float32"  # Adam's first moment; bfloat16 halves its memory
  # Top-level parameter groups that train (e.g. ("text_encoder", "mlm_head")); () = all. The
  # others get no update, no weight decay and no optimizer state.
  trainable: tuple[str, ...] = ()

  def __post_init__(self):
    trainable = self.trainable
    if isinstance(trainable, str) or not all(isinstance(t, str) for t in trainable):
      raise TypeError(f"optimizer.trainable must be a tuple of parameter group names, got "
                      f"{trainable!r}")
    object.__setattr__(self, "trainable", tuple(trainable))
    check_choice("optimizer.decay", self.decay, ("cosine", "linear", "constant"))
    check_choice("optimizer.mu_dtype", self.mu_dtype, ("float32", "bfloat16"))
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


def _leaf_name(path: tuple) -> str:
  names = [getattr(k, "key", None) for k in path]
  names = [n for n in names if isinstance(n, str)]
  return names[-1] if names else ""


def decay_mask(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_LEAVES, params)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  end = cfg.learning_rate * cfg.end_learning_rate_fraction
  decay_steps = max(total_steps - warmup, 1)
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps,
                                        alpha=cfg.end_learning_rate_fraction)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def make_optimizer(cfg: OptimizerConfig | Mapping[str, Any], total_steps: int
                   ) -> optax.GradientTransformation:
  if not isinstance(cfg, OptimizerConfig):
    cfg = dataclass_from_dict(OptimizerConfig, cfg, "optimizer")
  tx = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                   weight_decay=cfg.weight_decay, mask=decay_mask,
                   mu_dtype=jnp.dtype(cfg.mu_dtype))
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  if cfg.trainable:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               functools.partial(_trainable_labels, cfg.trainable))
  return tx


def check_trainable(trainable: tuple[str, ...], params: Any) -> None:
  unknown = sorted(set(trainable) - set(params))
  if unknown:
    raise ValueError(f"optimizer.trainable names {unknown}, which the model does not have; its "
                     f"parameter groups: {sorted(params)}")


def _trainable_labels(trainable: tuple[str, ...], params: Any) -> Any:
  check_trainable(trainable, params)
  return {k: jax.tree.map(lambda _, k=k: "train" if k in trainable else "frozen", v)
          for k, v in params.items()}


def _init(init_params_fn: Callable[[Array], Any], tx: optax.GradientTransformation):
  def init(rng):
    params = init_params_fn(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract_state(init_params_fn: Callable[[Array], Any], tx: optax.GradientTransformation,
                   param_shardings: Any, mesh: Mesh) -> tuple[TrainState, Any]:
  """(state of ShapeDtypeStructs carrying their shardings, the shardings): nothing allocated.

  Optimizer-state leaves shaped like a parameter (Adam's moments) take its sharding; the rest
  (step counts) are replicated.
  """
  shapes = jax.eval_shape(_init(init_params_fn, tx), jax.random.key(0))
  replicated = sharding.replicated(mesh)
  opt = _like_params(shapes.opt_state, shapes.params, param_shardings, replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return abstract, shardings


def create_state(init_params_fn: Callable[[Array], Any], tx: optax.GradientTransformation,
                 param_shardings: Any, mesh: Mesh, rng: Array, rules: sharding.Rules = ()
                 ) -> tuple[TrainState, Any]:
  """A freshly initialised state, created directly in its sharded layout."""
  _, shardings = abstract_state(init_params_fn, tx, param_shardings, mesh)
  init = jax.jit(_init(init_params_fn, tx), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    state = init(rng)
  return state, shardings


def abstract_train_state(model: FlavaModel, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: sharding.Rules) -> tuple[TrainState, Any]:
  """The FLAVA train state, abstract (see abstract_state)."""
  return abstract_state(lambda r: init_params(model, r), tx,
                        param_shardings(model, mesh, rules), mesh)


def create_train_state(model: FlavaModel, tx: optax.GradientTransformation, rng: Array,
                       mesh: Mesh, rules: sharding.Rules) -> tuple[TrainState, Any]:
  """A randomly initialised FLAVA train state, created directly in its sharded layout."""
  return create_state(lambda r: init_params(model, r), tx, param_shardings(model, mesh, rules),
                      mesh, rng, rules)


def _dict_keys(path: tuple) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _like_params(tree: Any, param_shapes: Any, param_values: Any, default: Any) -> Any:
  """Maps each leaf of `tree` (an optimizer state) to the value of the parameter whose key path
  ends its own path with the same shape (mu/nu of that parameter), else to `default`."""
  by_path = {}
  for (path, shape), (_, value) in zip(jax.tree_util.tree_leaves_with_path(param_shapes),
                                       jax.tree_util.tree_leaves_with_path(param_values)):
    by_path[_dict_keys(path)] = (shape.shape, value)

  def one(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(model: FlavaModel, mesh: Mesh, rules: sharding.Rules) -> Any:
  """NamedShardings of the model parameters alone."""
  return sharding.logical_to_shardings(logical_axes(model), mesh, rules)


def clamp_logit_scale(params: Any) -> Any:
  """The reference clamps the learned log temperature to [0, ln 100] before every step."""
  if "logit_scale" not in params:
    return params
  return dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX))


def make_loss_fn(model: FlavaModel, dvae: DVAE | None, loss_cfg: flava_losses.LossConfig,
                 kind: str, mesh: Mesh | None, local_batch: int
                 ) -> Callable[[Any, Any, Mapping[str, Array], Array], tuple[Array, dict]]:
  """loss_fn(params, dvae_params, batch, rng) -> (loss, metrics) for one batch kind."""
  if kind not in flava_losses.BATCH_KINDS:
    raise ValueError(f"batch kind {kind!r} is not one of {flava_losses.BATCH_KINDS}")

  def loss_fn(params, dvae_params, batch, rng):
    batch = model_pixels(batch)  # uint8 views from the pipeline -> normalised float inputs
    codes = None
    if kind != "text":
      if dvae is None:
        raise ValueError("image and paired batches need the dVAE for MIM/MMM targets")
      codes = jax.lax.stop_gradient(dvae.apply({"params": dvae_params}, batch["dvae_pixels"],
                                               method="tokens"))
      if codes.shape[1] != batch["patch_mask"].shape[1]:
        raise ValueError(f"the dVAE gives {codes.shape[1]} codes per image for "
                         f"{batch['patch_mask'].shape[1]} patches: dvae_pixels must be "
                         "(patch grid x 8) pixels wide")
    if kind == "paired":
      return flava_losses.paired_loss(model, params, batch, codes, rng, loss_cfg, mesh,
                                      local_batch)
    if kind == "image":
      return flava_losses.image_loss(model, params, batch, codes, loss_cfg)
    return flava_losses.text_loss(model, params, batch, loss_cfg)

  return loss_fn


def microbatches(batch: Mapping[str, Array], grad_accum: int, mesh: Mesh) -> dict[str, Array]:
  """[B, ...] -> [grad_accum, B / grad_accum, ...]; micro-batch j holds rows j, j + k, j + 2k...

  Taking every k-th row keeps each micro-batch spread over all data-parallel devices (each
  device's rows are contiguous), so no row moves between devices.
  """
  batch_axis = sharding.batch_sharding(mesh)

  def split(x):
    rows = x.shape[0]
    if rows % grad_accum:
      raise ValueError(f"a batch of {rows} rows does not split into grad_accum={grad_accum} "
                       "micro-batches")
    x = x.reshape(rows // grad_accum, grad_accum, *x.shape[1:])
    x = jax.lax.with_sharding_constraint(x, batch_axis)
    return jnp.moveaxis(x, 1, 0)

  return {k: split(v) for k, v in batch.items()}


def accumulated_value_and_grad(loss_fn: Callable, params: Any, batch: Mapping[str, Array],
                               rng: Array, grad_accum: int, mesh: Mesh
                               ) -> tuple[tuple[Array, dict], Any]:
  """Mean loss, metrics and gradients over `grad_accum` micro-batches, one at a time (lax.scan).

  Gradients accumulate in float32 in the parameters' layout; micro-batch j draws its
  randomness from fold_in(rng, j). Losses that normalise per batch (the contrastive loss over
  its micro-batch, masked-token means) see micro-batches, as in any accumulation.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    return grad_fn(params, batch, rng)
  micro = microbatches(batch, grad_accum, mesh)
  batch_axis = sharding.batch_sharding(mesh)

  def body(carry, inputs):
    grads_sum, loss_sum, metrics_sum = carry
    index, one = inputs
    one = {k: jax.lax.with_sharding_constraint(v, batch_axis) for k, v in one.items()}
    (loss, metrics), grads = grad_fn(params, one, jax.random.fold_in(rng, index))
    add = lambda a, b: a + b.astype(a.dtype)
    return (jax.tree.map(add, grads_sum, grads), loss_sum + loss,
            jax.tree.map(add, metrics_sum, metrics)), None

  (loss_shape, metrics_shape), _ = jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  init = (zeros(params), jnp.zeros((), jnp.float32), zeros(metrics_shape))
  del loss_shape
  (grads, loss, metrics), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
  scale = 1.0 / grad_accum
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
  return (loss * scale, jax.tree.map(lambda m: m * scale, metrics)), grads


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                    metrics: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update; adds the l2 norms of grads, params and updates to the metrics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = clamp_logit_scale(optax.apply_updates(state.params, updates))
  metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                 update_norm=optax.global_norm(updates))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: FlavaModel, dvae: DVAE | None, tx: optax.GradientTransformation,
                    loss_cfg: flava_losses.LossConfig, mesh: Mesh, rules: sharding.Rules,
                    kind: str, state_shardings: Any, local_batch: int, grad_accum: int = 1):
  """step(state, dvae_params, batch, rng) -> (state, metrics); jitted, state donated.

  local_batch: rows per data-parallel shard of the whole step; with grad_accum > 1 the step
  runs grad_accum micro-batches of local_batch / grad_accum rows each and applies one update.
  """
  if grad_accum < 1 or local_batch % grad_accum:
    raise ValueError(f"grad_accum={grad_accum} must be >= 1 and divide the {local_batch} rows "
                     "each data-parallel shard holds")
  loss_fn = make_loss_fn(model, dvae, loss_cfg, kind, mesh, local_batch // grad_accum)

  def step(state: TrainState, dvae_params, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(list(rules)):
      (loss, metrics), grads = accumulated_value_and_grad(
          lambda p, b, r: loss_fn(p, dvae_params, b, r), state.params, batch, rng, grad_accum,
          mesh)
    return apply_gradients(tx, state, grads, dict(metrics, loss=loss))

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, replicated,
                                       sharding.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def run(state, dvae_params, batch, rng):
    with jax.set_mesh(mesh):
      return jitted(state, dvae_params, batch, rng)

  run.jitted = jitted  # for lowering (AOT) and cost analysis
  return run
