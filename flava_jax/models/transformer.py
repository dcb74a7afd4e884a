"""The pre-LayerNorm transformer block stack shared by FLAVA's three encoders.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `head_dim`, `layers`, ...) and
activations are constrained with (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`, ...), so a
mesh and a set of rules (configs/) decide the sharding; this file never names a mesh axis.
Layers are scanned (`nn.scan`): parameters of layer i sit at index i of a leading `layers` axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from flava_jax.models.config import EncoderConfig, FlavaConfig
from flava_jax.models.splash import splash_attention

Dtype = Any
Array = jax.Array

# Logical names of activation axes. Parameter axes use the un-prefixed names.
BATCH, LENGTH, ACT_EMBED, ACT_MLP, ACT_HEADS, ACT_HEAD_DIM, ACT_VOCAB = (
    "batch", "length", "act_embed", "act_mlp", "act_heads", "act_head_dim", "act_vocab")


def dtype_of(name: str) -> Dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def dense_init(stddev: float) -> Callable[..., Array]:
  return nn.initializers.normal(stddev=stddev)


def param_with_axes(init: Callable[..., Array], names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  """Sharding hint on an activation; a no-op when no mesh/rules are in scope."""
  return nn.with_logical_constraint(x, names)


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (two-pass variance, as PyTorch computes it)."""

  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", param_with_axes(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("embed",)),
                      (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Dense(nn.Module):
  """y = x @ kernel + bias, with logical axis names on kernel [in, out] and bias [out]."""

  features: int
  axes: tuple[str | None, str | None]  # (input axis name, output axis name)
  use_bias: bool = True
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", param_with_axes(dense_init(self.init_std), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", param_with_axes(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def auto_attention_impl(dtype: Any) -> str:
  """"auto": cuDNN flash attention on GPUs in 16-bit compute (what cuDNN's fused kernel takes),
  XLA's attention everywhere else."""
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def attention_kernel(query: Array, key: Array, value: Array, mask: Array | None,
                     implementation: str) -> Array:
  """Softmax attention over [B, T, N, H] tensors via jax.nn.dot_product_attention.

  mask: [B, S] boolean, True for real key positions, or None. The cuDNN path expresses padding as
  key lengths, which is exact when masks are right-padded prefixes (what tokenizers and our data
  pipeline produce); the XLA path takes any mask. "auto" falls back to XLA's attention, with a
  warning, where cuDNN refuses the shapes or is missing.
  """
  if implementation == "splash":
    return splash_attention(query, key, value, mask)
  if implementation == "auto":
    if auto_attention_impl(query.dtype) == "cudnn":
      try:
        return _cudnn_attention(query, key, value, mask)
      except (RuntimeError, NotImplementedError, ValueError) as e:
        _warn_once(f"attention_impl=auto: cuDNN attention unavailable for {query.shape} "
                   f"{query.dtype} ({type(e).__name__}: {e}); using XLA's")
    implementation = "xla"
  if implementation == "cudnn":
    return _cudnn_attention(query, key, value, mask)
  if mask is None:
    return jax.nn.dot_product_attention(query, key, value, implementation="xla")
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask[:, None, None, :], implementation="xla")


def _cudnn_attention(query: Array, key: Array, value: Array, mask: Array | None) -> Array:
  if mask is None:
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
  lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
  return jax.nn.dot_product_attention(
      query, key, value, key_value_seq_lengths=lengths, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.warning(message)


class SelfAttention(nn.Module):
  config: EncoderConfig
  model: FlavaConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    cfg, dtype, pdtype = self.config, dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    std = self.model.initializer_range
    qkv_kernel = self.param(
        "qkv_kernel", param_with_axes(dense_init(std), ("embed", "qkv", "heads", "head_dim")),
        (cfg.hidden_size, 3, cfg.num_heads, cfg.head_dim), pdtype)
    qkv = jnp.einsum("btd,dknh->btknh", x.astype(dtype), qkv_kernel.astype(dtype))
    if cfg.qkv_bias:
      qkv_bias = self.param(
          "qkv_bias", param_with_axes(nn.initializers.zeros, ("qkv", "heads", "head_dim")),
          (3, cfg.num_heads, cfg.head_dim), pdtype)
      qkv = qkv + qkv_bias.astype(dtype)  # [B, T, 3, N, H]
    query, key, value = (
        constrain(qkv[:, :, i], (BATCH, LENGTH, ACT_HEADS, ACT_HEAD_DIM)) for i in range(3))
    context = attention_kernel(query, key, value, mask, self.model.attention_impl)
    context = constrain(context, (BATCH, LENGTH, ACT_HEADS, ACT_HEAD_DIM))
    out_kernel = self.param(
        "out_kernel", param_with_axes(dense_init(std), ("heads", "head_dim", "embed")),
        (cfg.num_heads, cfg.head_dim, cfg.hidden_size), pdtype)
    out_bias = self.param("out_bias", param_with_axes(nn.initializers.zeros, ("embed",)),
                          (cfg.hidden_size,), pdtype)
    out = jnp.einsum("btnh,nhd->btd", context, out_kernel.astype(dtype))
    return out + out_bias.astype(dtype)


class MLP(nn.Module):
  config: EncoderConfig
  model: FlavaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, dtype, pdtype = self.config, dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    std = self.model.initializer_range
    h = Dense(cfg.mlp_dim, ("embed", "mlp"), init_std=std, dtype=dtype, param_dtype=pdtype,
              name="wi")(x)
    h = constrain(jax.nn.gelu(h, approximate=False), (BATCH, LENGTH, ACT_MLP))
    return Dense(cfg.hidden_size, ("mlp", "embed"), init_std=std, dtype=dtype,
                 param_dtype=pdtype, name="wo")(h)


class TransformerBlock(nn.Module):
  """x + Attn(LN(x)), then + MLP(LN(.)). Signature fits nn.scan: (carry, mask) -> (carry, None)."""

  config: EncoderConfig
  model: FlavaConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> tuple[Array, None]:
    cfg, dtype = self.config, dtype_of(self.model.dtype)
    pdtype = dtype_of(self.model.param_dtype)
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    h = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm_attn")(x)
    x = x + SelfAttention(cfg, self.model, name="attention")(h, mask)
    h = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm_mlp")(x)
    x = x + MLP(cfg, self.model, name="mlp")(h)
    return constrain(x, (BATCH, LENGTH, ACT_EMBED)), None


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Encoder(nn.Module):
  """num_layers scanned TransformerBlocks. Returns the last block's output, before any final LN."""

  config: EncoderConfig
  model: FlavaConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    block = TransformerBlock
    if self.model.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[self.model.remat_policy],
                       prevent_cse=False)
    stack = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast,), length=self.config.num_layers,
        unroll=min(self.model.scan_unroll, self.config.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(self.config, self.model, name="layers")(x, mask)
    return x


class Pooler(nn.Module):
  """dense + tanh on token 0."""

  hidden_size: int
  model: FlavaConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    pooled = Dense(self.hidden_size, ("embed", "embed_out"), init_std=self.model.initializer_range,
                   dtype=dtype, param_dtype=pdtype, name="dense")(hidden[:, 0])
    return jnp.tanh(pooled)
