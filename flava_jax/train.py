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

  def __post_init__(self):
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
  return tx


def _init_boxed(model: FlavaModel, tx: optax.GradientTransformation):
  def init(rng):
    params = init_params(model, rng, boxed=True)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract_train_state(model: FlavaModel, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: sharding.Rules) -> tuple[TrainState, Any]:
  """(state of ShapeDtypeStructs carrying their shardings, the shardings): nothing allocated."""
  boxed = jax.eval_shape(_init_boxed(model, tx), jax.random.key(0))
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(model: FlavaModel, tx: optax.GradientTransformation, rng: Array,
                       mesh: Mesh, rules: sharding.Rules) -> tuple[TrainState, Any]:
  """A randomly initialised state, created directly in its sharded layout."""
  _, shardings = abstract_train_state(model, tx, mesh, rules)
  init_boxed = _init_boxed(model, tx)
  init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    state = init(rng)
  return state, shardings


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


def make_train_step(model: FlavaModel, dvae: DVAE | None, tx: optax.GradientTransformation,
                    loss_cfg: flava_losses.LossConfig, mesh: Mesh, rules: sharding.Rules,
                    kind: str, state_shardings: Any, local_batch: int):
  """step(state, dvae_params, batch, rng) -> (state, metrics); jitted, state donated."""
  loss_fn = make_loss_fn(model, dvae, loss_cfg, kind, mesh, local_batch)

  def step(state: TrainState, dvae_params, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(list(rules)):
      (loss, metrics), grads = jax.value_and_grad(
          lambda p: loss_fn(p, dvae_params, batch, rng), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = clamp_logit_scale(optax.apply_updates(state.params, updates))
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), update_norm=optax.global_norm(updates))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, replicated,
                                       sharding.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def run(state, dvae_params, batch, rng):
    with jax.set_mesh(mesh):
      return jitted(state, dvae_params, batch, rng)

  run.jitted = jitted  # for lowering (AOT) and cost analysis
  return run
