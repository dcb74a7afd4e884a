"""Train state, optimizer and the sharded, donated train step of any task (flava_jax/tasks/).

    exp = experiment.Experiment(config)       # task, mesh, rules, optimizer
    state = exp.create_state()                # created already sharded
    step = exp.train_step("paired")           # one jitted, donated step per batch kind
    state, metrics = step(state, exp.frozen(), batch, rng)

The state is created already sharded (eval_shape, then jit with out_shardings). It holds the
parameters, the optimizer state, the step and the task's extra state (momentum copies, queues);
the task's frozen inputs (FLAVA's dVAE) are an input of the step, never part of the state.

AdamW keeps one Adam step count per parameter group (the task's top-level groups,
`scale_by_grouped_adam`): a step whose loss does not reach a group (the image encoder in a
text-only step) leaves that group's parameters, moments and step count exactly as they were, with
no weight decay either, as PyTorch's AdamW skips parameters whose gradient is None. The
learning-rate schedule follows the run's step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from flava_jax import run_once, sharding
from flava_jax.parse import check_choice, dataclass_from_dict
from flava_jax.tasks.base import GradCacheSplit, LossOutput, StepContext, Task

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then cosine (or linear, constant, step) decay.

  decay="step" (BLIP's recipe): learning_rate * decay_rate ** (step // decay_every_steps),
  counted from step 0 (the warm-up replaces it while it lasts), never below
  end_learning_rate_fraction * learning_rate.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 10_000
  # The warm-up starts at this fraction of learning_rate (BLIP: 1e-6 / 3e-4).
  warmup_init_fraction: float = 0.0
  decay: str = "cosine"  # cosine | linear | constant | step
  end_learning_rate_fraction: float = 0.0
  decay_rate: float = 0.9  # decay="step": the factor per decay_every_steps
  decay_every_steps: int = 0  # decay="step": e.g. the steps of one epoch
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
    check_choice("optimizer.decay", self.decay, ("cosine", "linear", "constant", "step"))
    if self.decay == "step" and self.decay_every_steps <= 0:
      raise ValueError("optimizer.decay='step' needs optimizer.decay_every_steps > 0, got "
                       f"{self.decay_every_steps}")
    if not 0.0 <= self.warmup_init_fraction <= 1.0:
      raise ValueError("optimizer.warmup_init_fraction must be in [0, 1], got "
                       f"{self.warmup_init_fraction}")
    check_choice("optimizer.mu_dtype", self.mu_dtype, ("float32", "bfloat16"))
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  extra: Any  # the task's extra state ({} for most)


def _dict_path(path: tuple) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params: Any, decays: Callable[[tuple[str, ...]], bool],
               trainable: tuple[str, ...] = ()) -> Any:
  """True where a parameter gets weight decay: the task's rule, in a group that trains."""
  def one(path, _):
    keys = _dict_path(path)
    return decays(keys) and (not trainable or (bool(keys) and keys[0] in trainable))
  return jax.tree_util.tree_map_with_path(one, params)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  end = cfg.learning_rate * cfg.end_learning_rate_fraction
  start = cfg.learning_rate * cfg.warmup_init_fraction
  if cfg.decay == "step":
    def staircase(step):
      step = jnp.asarray(step, jnp.float32)
      decayed = cfg.learning_rate * cfg.decay_rate ** jnp.floor(step / cfg.decay_every_steps)
      warming = start + (cfg.learning_rate - start) * step / max(warmup, 1)
      return jnp.where(step < warmup, warming, jnp.maximum(end, decayed))
    return staircase
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
      [optax.linear_schedule(start, cfg.learning_rate, warmup), decay], [warmup])


class GroupedAdamState(NamedTuple):
  """Adam's moments of the trainable groups and one step count per group."""

  count: dict  # group -> int32 []
  mu: dict     # group -> its parameters' first moments
  nu: dict     # group -> second moments


def scale_by_grouped_adam(b1: float, b2: float, eps: float, mu_dtype: Any,
                          trainable: tuple[str, ...]) -> optax.GradientTransformation:
  """optax.scale_by_adam with one step count per top-level parameter group (the bias correction
  of a group counts that group's updates), moments for the `trainable` groups only; the others'
  updates are zeros. A step that must leave a group alone restores its count and moments
  (`keep_groups`), as PyTorch's AdamW leaves a parameter without gradient."""
  def init(params):
    check_trainable(trainable, params)
    return GroupedAdamState(
        count={g: jnp.zeros([], jnp.int32) for g in trainable},
        mu={g: jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params[g])
            for g in trainable},
        nu={g: jax.tree.map(jnp.zeros_like, params[g]) for g in trainable})

  def update(updates, state, params=None):
    del params
    out, count, mu, nu = {}, {}, {}, {}
    for group, grads in updates.items():
      if group not in trainable:
        out[group] = jax.tree.map(jnp.zeros_like, grads)
        continue
      mu[group] = optax.tree_utils.tree_update_moment(grads, state.mu[group], b1, 1)
      nu[group] = optax.tree_utils.tree_update_moment_per_elem_norm(grads, state.nu[group], b2,
                                                                    2)
      count[group] = optax.safe_increment(state.count[group])
      mu_hat = optax.tree_utils.tree_bias_correction(mu[group], b1, count[group])
      nu_hat = optax.tree_utils.tree_bias_correction(nu[group], b2, count[group])
      out[group] = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
      mu[group] = jax.tree.map(lambda m: m.astype(mu_dtype), mu[group])
      nu[group] = jax.tree.map(lambda n, old: n.astype(old.dtype), nu[group], state.nu[group])
    return out, GroupedAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig | Mapping[str, Any], total_steps: int,
                   decays: Callable[[tuple[str, ...]], bool], groups: tuple[str, ...]
                   ) -> optax.GradientTransformation:
  """AdamW with one Adam step count per parameter group (see the module docstring), the task's
  weight-decay rule, the warm-up + decay schedule and optional global-norm clipping.

  groups: the parameter tree's top-level groups; those optimizer.trainable leaves out get no
  state and no update."""
  if not isinstance(cfg, OptimizerConfig):
    cfg = dataclass_from_dict(OptimizerConfig, cfg, "optimizer")
  trainable = cfg.trainable or tuple(groups)
  parts = [scale_by_grouped_adam(cfg.b1, cfg.b2, cfg.eps, jnp.dtype(cfg.mu_dtype), trainable),
           optax.add_decayed_weights(cfg.weight_decay,
                                     mask=lambda p: decay_mask(p, decays, cfg.trainable)),
           optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps))]
  if cfg.grad_clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(cfg.grad_clip_norm))
  return optax.chain(*parts)


def keep_groups(old: Any, new: Any, groups: tuple[str, ...]) -> Any:
  """The optimizer state `new` with the Adam counts and moments of `groups` taken from `old`."""
  if not groups:
    return new
  if isinstance(new, GroupedAdamState):
    pick = lambda field: {g: (getattr(old, field) if g in groups else getattr(new, field))[g]
                          for g in getattr(new, field)}
    return GroupedAdamState(count=pick("count"), mu=pick("mu"), nu=pick("nu"))
  if isinstance(new, tuple) and not hasattr(new, "_fields"):  # a chain's states
    return tuple(keep_groups(o, n, groups) for o, n in zip(old, new, strict=True))
  return new


def check_trainable(trainable: tuple[str, ...], params: Any) -> None:
  unknown = sorted(set(trainable) - set(params))
  if unknown:
    raise ValueError(f"optimizer.trainable names {unknown}, which the model does not have; its "
                     f"parameter groups: {sorted(params)}")


def _init(init_fn: Callable[[Array], tuple[Any, Any]], tx: optax.GradientTransformation):
  def init(rng):
    params, extra = init_fn(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      extra=extra)
  return init


def state_shapes(param_shapes: Any, init_extra: Callable[[Array, Any], Any],
                 tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """The state's ShapeDtypeStructs from the parameters' (a jax.eval_shape of the model's init):
  the optimizer and the extra state are shaped without tracing the model again."""
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes,
                    opt_state=jax.eval_shape(tx.init, param_shapes),
                    extra=jax.eval_shape(lambda r, p: init_extra(jax.random.fold_in(r, 1), p),
                                         rng, param_shapes))


def abstract_state(shapes: TrainState, param_shardings: Any, extra_shardings: Any,
                   mesh: Mesh) -> tuple[TrainState, Any]:
  """(state of ShapeDtypeStructs carrying their shardings, the shardings): nothing allocated.

  `shapes`: the state's ShapeDtypeStructs (state_shapes, or a jax.eval_shape of the init).
  Optimizer-state leaves shaped like a parameter (Adam's moments) take its sharding; the rest
  (step counts) are replicated.
  """
  replicated = sharding.replicated(mesh)
  opt = _like_params(shapes.opt_state, shapes.params, param_shardings, replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt,
                         extra=extra_shardings)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return abstract, shardings


def create_state(init_fn: Callable[[Array], tuple[Any, Any]], tx: optax.GradientTransformation,
                 param_shardings: Any, extra_shardings: Any, mesh: Mesh, rng: Array,
                 rules: sharding.Rules = (), shardings: Any = None) -> tuple[TrainState, Any]:
  """A freshly initialised state, created directly in its sharded layout. `shardings`: the
  state's (abstract_state's), when the caller has them; else found by tracing `init_fn`."""
  if shardings is None:
    shapes = jax.eval_shape(_init(init_fn, tx), rng)
    _, shardings = abstract_state(shapes, param_shardings, extra_shardings, mesh)
  init = run_once.jit(_init(init_fn, tx), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    state = init(rng)
  return state, shardings


def _like_params(tree: Any, param_shapes: Any, param_values: Any, default: Any) -> Any:
  """Maps each leaf of `tree` (an optimizer state) to the value of the parameter whose key path
  ends its own path with the same shape (mu/nu of that parameter), else to `default`."""
  shapes = jax.tree_util.tree_leaves_with_path(param_shapes)
  values = jax.tree_util.tree_leaves_with_path(param_values)
  by_path = {}
  for (path, shape), (_, value) in zip(shapes, values, strict=True):
    by_path[_dict_path(path)] = (shape.shape, value)

  def one(path, leaf):
    keys = _dict_path(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(one, tree)


def microbatches(batch: Any, grad_accum: int, mesh: Mesh) -> Any:
  """Each [B, ...] array of a batch (any pytree) -> [grad_accum, B / grad_accum, ...]; micro-batch
  j holds rows j, j + k, j + 2k...

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

  return jax.tree.map(split, batch)


def merge_microbatches(tree: Any, mesh: Mesh) -> Any:
  """[k, B / k, ...] per-micro-batch arrays -> [B, ...] in the batch's own row order (the
  inverse of `microbatches`)."""
  batch_axis = sharding.batch_sharding(mesh)

  def merge(x):
    x = jax.lax.with_sharding_constraint(jnp.moveaxis(x, 0, 1), batch_axis)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(merge, tree)


def _zeros_f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _add(a: Array, b: Array) -> Array:
  return a + b.astype(a.dtype)


def accumulated_value_and_grad(loss_fn: Callable, params: Any, batch: Mapping[str, Array],
                               rng: Array, grad_accum: int, mesh: Mesh
                               ) -> tuple[tuple[Array, tuple[dict, Any]], Any]:
  """Mean loss, metrics and gradients over `grad_accum` micro-batches, one at a time (lax.scan).

  loss_fn(params, batch, rng) -> (loss, (metrics, extra_update)). Gradients accumulate in
  float32 in the parameters' layout; micro-batch j draws its randomness from fold_in(rng, j).
  Losses that normalise per batch (the contrastive loss over its micro-batch, masked-token
  means) see micro-batches, as in any accumulation (GradCache, `gradcache_value_and_grad`,
  keeps the whole batch's negatives). Extra-state updates of the micro-batches are
  concatenated along their rows.
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
    (loss, (metrics, extra_update)), grads = grad_fn(params, one, jax.random.fold_in(rng, index))
    return (jax.tree.map(_add, grads_sum, grads), loss_sum + loss,
            jax.tree.map(_add, metrics_sum, metrics)), extra_update

  (_, (metrics_shape, _)), _ = jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  init = (_zeros_f32(params), jnp.zeros((), jnp.float32), _zeros_f32(metrics_shape))
  (grads, loss, metrics), extra_updates = jax.lax.scan(
      body, init, (jnp.arange(grad_accum), micro))
  scale = 1.0 / grad_accum
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
  if extra_updates is not None:
    extra_updates = merge_microbatches(extra_updates, mesh)
  return (loss * scale, (jax.tree.map(lambda m: m * scale, metrics), extra_updates)), grads


def gradcache_value_and_grad(split: GradCacheSplit, params: Any, frozen: Any,
                             batch: Mapping[str, Array], rng: Array, grad_accum: int,
                             mesh: Mesh, ctx: StepContext
                             ) -> tuple[tuple[Array, tuple[dict, Any]], Any]:
  """The whole batch's loss and gradients in `grad_accum` micro-batches, every negative kept
  (GradCache): (1) each micro-batch's embeddings and row-decomposable terms without gradients;
  (2) the batch-level (contrastive) loss over all embeddings and its gradients with respect to
  the embeddings and the parameters; (3) each micro-batch's backward pass of
  <cached embedding gradients, embeddings> + its terms over the whole batch's normalisers.
  Memory is one micro-batch's activations; compute is one extra forward pass.
  """
  micro = microbatches(batch, grad_accum, mesh)
  batch_axis = sharding.batch_sharding(mesh)
  constrain = lambda one: {k: jax.lax.with_sharding_constraint(v, batch_axis)
                           for k, v in one.items()}

  def forward(_, inputs):
    index, one = inputs
    embeddings, terms, metrics = split.embed(params, frozen, constrain(one),
                                             jax.random.fold_in(rng, index), ctx)
    return None, (jax.lax.stop_gradient(embeddings), jax.lax.stop_gradient(terms), metrics)

  _, (embeddings, terms, metrics) = jax.lax.scan(
      forward, None, (jnp.arange(grad_accum), micro))
  totals = {name: jnp.maximum(jnp.sum(den), 1e-9) for name, (_, den) in terms.items()}
  all_embeddings = merge_microbatches(embeddings, mesh)
  contrast_fn = lambda p, e: split.contrast(p, e, ctx)
  (contrast, contrast_metrics), (param_grads, embedding_grads) = jax.value_and_grad(
      contrast_fn, argnums=(0, 1), has_aux=True)(params, all_embeddings)
  weight = split.weights.get("global_contrastive", 1.0)
  # Back to micro-batch layout: [k, B / k, ...], scaled by the contrastive term's weight.
  embedding_grads = microbatches(jax.tree.map(lambda g: weight * g, embedding_grads),
                                 grad_accum, mesh)

  def surrogate(p, one, cached, r):
    emb, tms, _ = split.embed(p, frozen, constrain(one), r, ctx)
    dot = sum(jnp.sum(e.astype(jnp.float32) * jax.lax.stop_gradient(g))
              for e, g in zip(jax.tree.leaves(emb), jax.tree.leaves(cached), strict=True))
    return dot + sum(split.weights.get(name, 1.0) * num / totals[name]
                     for name, (num, _) in tms.items())

  grad_fn = jax.grad(surrogate)

  def backward(grads_sum, inputs):
    index, one, cached = inputs
    grads = grad_fn(params, one, cached, jax.random.fold_in(rng, index))
    return jax.tree.map(_add, grads_sum, grads), None

  grads, _ = jax.lax.scan(backward, jax.tree.map(lambda g: weight * g.astype(jnp.float32),
                                                 param_grads),
                          (jnp.arange(grad_accum), micro, embedding_grads))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  term_means = {name: jnp.sum(num) / totals[name] for name, (num, _) in terms.items()}
  loss = weight * contrast + sum(split.weights.get(name, 1.0) * value
                                 for name, value in term_means.items())
  metrics = dict(jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), **contrast_metrics,
                 **term_means)
  return (loss, (metrics, None)), grads


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                    metrics: dict[str, Array], keep: tuple[str, ...] = (),
                    task: Task | None = None, extra_update: Any = None
                    ) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update, then the task's post-update hook; the groups in `keep` (no gradient
  in this step, or not trainable) keep their parameters and Adam states exactly. Adds the l2
  norms of grads, params and updates to the metrics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if keep:
    updates = {k: jax.tree.map(jnp.zeros_like, v) if k in keep else v
               for k, v in updates.items()}
  params = optax.apply_updates(state.params, updates)
  if keep:
    params = {k: state.params[k] if k in keep else v for k, v in params.items()}
    opt_state = keep_groups(state.opt_state, opt_state, keep)
  extra = state.extra
  if task is not None:
    params, extra = task.after_update(params, extra, extra_update)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 update_norm=optax.tree.norm(updates))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics


def _loss_and_grads(task: Task, kind: str, mesh: Mesh, rules: sharding.Rules,
                    local_batch: int, grad_accum: int, grad_cache: bool):
  """fn(state, frozen, batch, rng) -> ((loss, (metrics, extra_update)), grads): the train
  step's forward and backward pass (see make_train_step), traced under the logical rules."""
  if grad_accum < 1 or local_batch % grad_accum:
    raise ValueError(f"grad_accum={grad_accum} must be >= 1 and divide the {local_batch} rows "
                     "each data-parallel shard holds")
  split = task.gradcache(kind) if grad_cache and grad_accum > 1 else None

  def fn(state: TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    ctx = StepContext(mesh=mesh, local_batch=local_batch // grad_accum, step=state.step)

    def loss_fn(params, one, r):
      out: LossOutput = task.loss(kind, params, state.extra, frozen, one, r, ctx)
      return out.loss, (out.metrics, out.extra_update)

    with nn.logical_axis_rules(list(rules)):
      if split is not None:
        return gradcache_value_and_grad(split, state.params, frozen, batch, rng, grad_accum,
                                        mesh, ctx)
      return accumulated_value_and_grad(loss_fn, state.params, batch, rng, grad_accum, mesh)

  return fn


def _jit_on_mesh(fn: Callable, mesh: Mesh, state_shardings, frozen_shardings, out_shardings,
                 donate_argnums=(), compiler_options: dict[str, Any] | None = None):
  """fn(state, frozen, batch, rng) jitted with its inputs' shardings (frozen parameters
  replicated unless given, the batch split over the data axes, the key replicated) and run
  under the mesh."""
  replicated = sharding.replicated(mesh)
  in_shardings = (state_shardings, replicated if frozen_shardings is None else frozen_shardings,
                  sharding.batch_sharding(mesh), replicated)
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums, compiler_options=compiler_options)

  def run(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  run.jitted = jitted  # for lowering (AOT) and cost analysis
  return run


def make_train_step(task: Task, kind: str, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules, state_shardings: Any, local_batch: int,
                    grad_accum: int = 1, grad_cache: bool = False, keep: tuple[str, ...] = (),
                    frozen_shardings: Any = None, compiler_options: dict[str, Any] | None = None):
  """step(state, frozen, batch, rng) -> (state, metrics); jitted, state donated.

  local_batch: rows per data-parallel shard of the whole step; with grad_accum > 1 the step
  runs grad_accum micro-batches of local_batch / grad_accum rows each and applies one update
  (GradCache when grad_cache and the task offers a split for this kind). keep: parameter groups
  this step must not update (see apply_gradients). compiler_options: XLA's, for this step's
  compile (run_once.compiler_options() for a step that runs once or twice, as in a test).
  """
  loss_and_grads = _loss_and_grads(task, kind, mesh, rules, local_batch, grad_accum, grad_cache)

  def step(state: TrainState, frozen, batch, rng):
    (loss, (metrics, extra_update)), grads = loss_and_grads(state, frozen, batch, rng)
    with nn.logical_axis_rules(list(rules)):
      return apply_gradients(tx, state, grads, dict(metrics, loss=loss), keep, task,
                             extra_update)

  return _jit_on_mesh(step, mesh, state_shardings, frozen_shardings,
                      (state_shardings, sharding.replicated(mesh)), (0,), compiler_options)


def make_grad_step(task: Task, kind: str, mesh: Mesh, rules: sharding.Rules,
                   state_shardings: Any, local_batch: int, grad_accum: int = 1,
                   grad_cache: bool = False, frozen_shardings: Any = None,
                   compiler_options: dict[str, Any] | None = None):
  """grads(state, frozen, batch, rng) -> (metrics with the loss, gradients): make_train_step's
  forward and backward pass without the update (the same arguments, nothing donated); the
  gradients come out in the parameters' shardings. For checking a task's gradients on a mesh
  against one device's, and for inspecting them: without the optimizer's per-parameter
  programs it compiles in about half the time of the whole step."""
  loss_and_grads = _loss_and_grads(task, kind, mesh, rules, local_batch, grad_accum, grad_cache)

  def grads_of(state: TrainState, frozen, batch, rng):
    (loss, (metrics, _)), grads = loss_and_grads(state, frozen, batch, rng)
    return dict(metrics, loss=loss), grads

  return _jit_on_mesh(grads_of, mesh, state_shardings, frozen_shardings,
                      (sharding.replicated(mesh), state_shardings.params), (), compiler_options)
