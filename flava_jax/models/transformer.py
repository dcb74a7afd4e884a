"""The transformer block stack shared by FLAVA's three encoders and by text decoders.

Layers take an EncoderConfig (the shapes) and a ComputeConfig (dtypes, attention kernel, remat,
scan unrolling, init scale), never a family's config, so FLAVA, BLIP and later families share them.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `head_dim`, `layers`, ...) and
activations are constrained with (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`, ...), so a
mesh and a set of rules (configs/) decide the sharding; this file never names a mesh axis.
Layers are scanned (`nn.scan`): parameters of layer i sit at index i of a leading `layers` axis.

Decoder options (module attributes, defaults give FLAVA's encoder blocks exactly):
  causal:          self-attention where position t sees positions <= t (and real keys only).
  cross_attention: a sublayer between self-attention and the MLP attending to another sequence
                   `encoder_hidden` [B, S, D_enc] with its padding mask `encoder_mask` [B, S].
  norm_first:      True: pre-LN (ViT, FLAVA), x + f(LN(x)); False: post-LN (BERT, BLIP's text
                   encoder/decoder), LN(x + f(x)). Same parameter names either way.
They are attributes rather than EncoderConfig fields so that FLAVA's configs and the configs saved
in its checkpoints stay as they are; a family's config carries them and passes them down.

Incremental decoding (`decode=True`) keeps a key/value cache in the "cache" collection, the flax
linen way: a first call with decode=True creates zeroed variables shaped by its input (run it under
`jax.eval_shape` on a [B, max_length] input and take zeros, see `init_cache`), later calls write
their T_step keys/values at `cache_index` and attend to every real cached key at or before each
query's position. Per layer (under the scan each gets a leading `layers` axis):
  attention/cached_key, cached_value [B, max_length, N, H], cached_mask [B, max_length] (real keys),
  attention/cache_index [] (int32, next free position);
  cross_attention/cached_key, cached_value [B, S, N, H], cached_mask [B, S]: the encoder sequence's
  projected keys/values, computed once: a decode call given `encoder_hidden` (the prefill) projects
  and stores them, calls given None (the steps) read them, so no step recomputes the S x D_enc
  projections.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from flava_jax.models.config import ComputeConfig, EncoderConfig
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
                     implementation: str, causal: bool = False) -> Array:
  """Softmax attention over [B, T, N, H] queries and [B, S, N, H] keys/values.

  mask: [B, S] boolean, True for real key positions, or None. causal: query t attends to keys
  <= t only (self-attention, T == S), on top of the mask. The cuDNN path expresses padding as
  key lengths, which is exact when masks are right-padded prefixes (what tokenizers and our data
  pipeline produce); the XLA path takes any mask. "auto" falls back to XLA's attention, with a
  warning, where cuDNN refuses the shapes or is missing. Splash is bidirectional self-attention
  only.
  """
  if implementation == "splash":
    if causal:
      raise NotImplementedError(
          "attention_impl='splash' has no causal mask here; use 'xla' or 'cudnn' for decoders")
    return splash_attention(query, key, value, mask)
  if implementation == "auto":
    if auto_attention_impl(query.dtype) == "cudnn":
      try:
        return _cudnn_attention(query, key, value, mask, causal)
      except (RuntimeError, NotImplementedError, ValueError) as e:
        _warn_once(f"attention_impl=auto: cuDNN attention unavailable for {query.shape} "
                   f"{query.dtype} ({type(e).__name__}: {e}); using XLA's")
    implementation = "xla"
  if implementation == "cudnn":
    return _cudnn_attention(query, key, value, mask, causal)
  if mask is None:
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation="xla")
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask[:, None, None, :], is_causal=causal, implementation="xla")


def _cudnn_attention(query: Array, key: Array, value: Array, mask: Array | None,
                     causal: bool = False) -> Array:
  if mask is None:
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal,
                                        implementation="cudnn")
  lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
  return jax.nn.dot_product_attention(
      query, key, value, key_value_seq_lengths=lengths, is_causal=causal, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.warning(message)


def _cached_attention(query: Array, key: Array, value: Array, mask: Array) -> Array:
  """Attention of decode steps: mask [B, 1, T, S] from the cache's positions.

  Always XLA's attention: a step has a handful of queries (no gain from a fused kernel) and its
  mask is relative to the cache index, which neither cuDNN's is_causal nor splash express.
  """
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def attention_output(module: nn.Module, context: Array, cfg: EncoderConfig,
                     compute: ComputeConfig) -> Array:
  """An attention sublayer's output projection, [B, T, N, H] -> [B, T, D]: the module's
  `out_kernel` [heads, head_dim, embed] and `out_bias` [embed]."""
  dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
  out_kernel = module.param(
      "out_kernel", param_with_axes(dense_init(compute.initializer_range),
                                    ("heads", "head_dim", "embed")),
      (cfg.num_heads, cfg.head_dim, cfg.hidden_size), pdtype)
  out_bias = module.param("out_bias", param_with_axes(nn.initializers.zeros, ("embed",)),
                          (cfg.hidden_size,), pdtype)
  out = jnp.einsum("btnh,nhd->btd", context, out_kernel.astype(dtype))
  return out + out_bias.astype(dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection; optionally causal and cached."""

  config: EncoderConfig
  compute: ComputeConfig
  causal: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    """x [B, T, D]; mask [B, T] True for real tokens (the keys x contributes), or None. In decode
    steps x holds the T_step new tokens and mask their reality, recorded in the cache."""
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
    std = compute.initializer_range
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
    if self.decode and self.has_variable("cache", "cached_key"):
      context = self._decode_step(query, key, value, mask)
    else:
      if self.decode:  # the creating call: zeroed cache variables shaped like this input
        self._cache_variables(key, key.shape[1])
      context = attention_kernel(query, key, value, mask, compute.attention_impl, self.causal)
    context = constrain(context, (BATCH, LENGTH, ACT_HEADS, ACT_HEAD_DIM))
    return attention_output(self, context, cfg, compute)

  def _cache_variables(self, key: Array, max_length: int):
    """The cache variables; created zeroed for max_length positions where absent."""
    batch, _, heads, head_dim = key.shape
    shape = (batch, max_length, heads, head_dim)
    return (self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype),
            self.variable("cache", "cached_value", jnp.zeros, shape, key.dtype),
            self.variable("cache", "cached_mask", jnp.zeros, shape[:2], jnp.bool_),
            self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32)))

  def _decode_step(self, query: Array, key: Array, value: Array, mask: Array | None) -> Array:
    """Writes this call's T_step keys/values at cache_index and attends to the cache."""
    cached_key, cached_value, cached_mask, cache_index = self._cache_variables(key, 0)
    batch, steps = key.shape[:2]
    max_length = cached_key.value.shape[1]
    start = cache_index.value
    zero = jnp.zeros((), jnp.int32)
    names = (BATCH, LENGTH, ACT_HEADS, ACT_HEAD_DIM)
    # Positions past max_length are clamped by dynamic_update_slice: callers size the cache.
    keys = constrain(jax.lax.dynamic_update_slice(cached_key.value, key, (zero, start, zero, zero)),
                     names)  # [B, S_max, N, H]
    values = constrain(
        jax.lax.dynamic_update_slice(cached_value.value, value, (zero, start, zero, zero)), names)
    real = jnp.ones((batch, steps), bool) if mask is None else mask.astype(bool)
    real_keys = constrain(jax.lax.dynamic_update_slice(cached_mask.value, real, (zero, start)),
                          (BATCH, LENGTH))  # [B, S_max]; never-written positions stay False
    cached_key.value, cached_value.value, cached_mask.value = keys, values, real_keys
    cache_index.value = start + steps
    attend = real_keys[:, None, None, :]  # [B, 1, 1, S_max]
    if self.causal:
      query_positions = start + jnp.arange(steps)  # [T]
      visible = jnp.arange(max_length)[None, :] <= query_positions[:, None]  # [T, S_max]
      attend = attend & visible[None, None]
    return _cached_attention(query, keys, values, attend)


class CrossAttention(nn.Module):
  """Queries from the sequence [B, T, D], keys/values from an encoder sequence [B, S, D_enc].

  Parameters: q_kernel [embed, heads, head_dim] (+ q_bias), kv_kernel [embed(D_enc), qkv(2), heads,
  head_dim] (+ kv_bias [qkv(2), heads, head_dim]), out_kernel, out_bias as in SelfAttention.
  """

  config: EncoderConfig
  compute: ComputeConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, encoder_hidden: Array | None,
               encoder_mask: Array | None) -> Array:
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
    std = compute.initializer_range
    if compute.attention_impl == "splash":
      raise NotImplementedError("attention_impl='splash' is self-attention only; use 'xla' or "
                                "'cudnn' for cross-attention")
    names = (BATCH, LENGTH, ACT_HEADS, ACT_HEAD_DIM)
    q_kernel = self.param(
        "q_kernel", param_with_axes(dense_init(std), ("embed", "heads", "head_dim")),
        (cfg.hidden_size, cfg.num_heads, cfg.head_dim), pdtype)
    query = jnp.einsum("btd,dnh->btnh", x.astype(dtype), q_kernel.astype(dtype))
    if cfg.qkv_bias:
      q_bias = self.param("q_bias", param_with_axes(nn.initializers.zeros, ("heads", "head_dim")),
                          (cfg.num_heads, cfg.head_dim), pdtype)
      query = query + q_bias.astype(dtype)
    query = constrain(query, names)  # [B, T, N, H]

    key = value = None
    if encoder_hidden is not None:
      encoder_hidden = constrain(encoder_hidden, (BATCH, LENGTH, ACT_EMBED))
      kv_kernel = self.param(
          "kv_kernel", param_with_axes(dense_init(std), ("embed", "qkv", "heads", "head_dim")),
          (encoder_hidden.shape[-1], 2, cfg.num_heads, cfg.head_dim), pdtype)
      kv = jnp.einsum("bsd,dknh->bsknh", encoder_hidden.astype(dtype), kv_kernel.astype(dtype))
      if cfg.qkv_bias:
        kv_bias = self.param(
            "kv_bias", param_with_axes(nn.initializers.zeros, ("qkv", "heads", "head_dim")),
            (2, cfg.num_heads, cfg.head_dim), pdtype)
        kv = kv + kv_bias.astype(dtype)  # [B, S, 2, N, H]
      key, value = constrain(kv[:, :, 0], names), constrain(kv[:, :, 1], names)
      if encoder_mask is None:
        encoder_mask = jnp.ones(encoder_hidden.shape[:2], bool)
      encoder_mask = encoder_mask.astype(bool)

    if self.decode:
      key, value, encoder_mask = self._cached(key, value, encoder_mask)
      context = _cached_attention(query, key, value, encoder_mask[:, None, None, :])
    elif key is None:
      raise ValueError("cross-attention needs encoder_hidden [B, S, D_enc]")
    else:
      context = attention_kernel(query, key, value, encoder_mask, compute.attention_impl)
    context = constrain(context, names)
    return attention_output(self, context, cfg, compute)

  def _cached(self, key: Array | None, value: Array | None, mask: Array | None
              ) -> tuple[Array, Array, Array]:
    """Stores freshly projected encoder keys/values (prefill), or reads the stored ones (steps)."""
    initialized = self.has_variable("cache", "cached_key")
    if key is None:
      if not initialized:
        raise ValueError("cross-attention: the first decode call needs encoder_hidden")
      cached = [self.get_variable("cache", name)
                for name in ("cached_key", "cached_value", "cached_mask")]
      return tuple(cached)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cached_mask = self.variable("cache", "cached_mask", jnp.zeros, mask.shape, jnp.bool_)
    if initialized:  # the creating call leaves zeros, as the self-attention cache does
      cached_key.value, cached_value.value, cached_mask.value = key, value, mask
    return key, value, mask


class MLP(nn.Module):
  config: EncoderConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
    std = compute.initializer_range
    h = Dense(cfg.mlp_dim, ("embed", "mlp"), init_std=std, dtype=dtype, param_dtype=pdtype,
              name="wi")(x)
    h = constrain(jax.nn.gelu(h, approximate=False), (BATCH, LENGTH, ACT_MLP))
    return Dense(cfg.hidden_size, ("mlp", "embed"), init_std=std, dtype=dtype,
                 param_dtype=pdtype, name="wo")(h)


class TransformerBlock(nn.Module):
  """Self-attention, optional cross-attention, MLP; each a residual sublayer with its LayerNorm.

  Pre-LN (norm_first): x + f(LN(x)); post-LN: LN(x + f(x)). Parameters: norm_attn, attention,
  [norm_cross, cross_attention,] norm_mlp, mlp. Signature fits nn.scan: (carry, *broadcast) ->
  (carry, None).
  """

  config: EncoderConfig
  compute: ComputeConfig
  causal: bool = False
  cross_attention: bool = False
  norm_first: bool = True
  decode: bool = False
  collect: bool = False  # also return the block's output (the scan stacks them per layer)

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, encoder_hidden: Array | None = None,
               encoder_mask: Array | None = None) -> tuple[Array, Array | None]:
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)

    def residual(x: Array, norm_name: str, sublayer: Callable[[Array], Array]) -> Array:
      norm = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name=norm_name)
      return x + sublayer(norm(x)) if self.norm_first else norm(x + sublayer(x))

    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    attention = SelfAttention(cfg, compute, self.causal, self.decode, name="attention")
    x = residual(x, "norm_attn", lambda h: attention(h, mask))
    if self.cross_attention:
      cross = CrossAttention(cfg, compute, self.decode, name="cross_attention")
      x = residual(x, "norm_cross", lambda h: cross(h, encoder_hidden, encoder_mask))
    x = residual(x, "norm_mlp", MLP(cfg, compute, name="mlp"))
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    return x, (x if self.collect else None)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Encoder(nn.Module):
  """num_layers scanned TransformerBlocks. Returns the last block's output, before any final LN.

  Decoders set causal / cross_attention / norm_first (see the module docstring) and call with
  decode=True to use the key/value cache; layer i's cache sits at index i of the cache leaves.
  """

  config: EncoderConfig
  compute: ComputeConfig
  causal: bool = False
  cross_attention: bool = False
  norm_first: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, encoder_hidden: Array | None = None,
               encoder_mask: Array | None = None, *, decode: bool = False,
               every_layer: bool = False) -> Array | tuple[Array, Array]:
    """x [B, T, D]; mask [B, T] (True: real token) or None; encoder_hidden [B, S, D_enc] and
    encoder_mask [B, S] for cross-attention (encoder_hidden None in decode steps after the
    prefill: the cached projections are used). every_layer: also return each block's output,
    stacked [num_layers, B, T, D] (the last is the first result)."""
    if encoder_hidden is not None and not self.cross_attention:
      raise ValueError("encoder_hidden given to an Encoder built without cross_attention")
    block = TransformerBlock
    if self.compute.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[self.compute.remat_policy],
                       prevent_cse=False)
    stack = nn.scan(
        block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.config.num_layers,
        unroll=min(self.compute.scan_unroll, self.config.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, outputs = stack(self.config, self.compute, self.causal, self.cross_attention,
                       self.norm_first, decode, every_layer,
                       name="layers")(x, mask, encoder_hidden, encoder_mask)
    return (x, outputs) if every_layer else x


class Pooler(nn.Module):
  """dense + tanh on token 0."""

  hidden_size: int
  compute: ComputeConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    dtype, pdtype = dtype_of(self.compute.dtype), dtype_of(self.compute.param_dtype)
    pooled = Dense(self.hidden_size, ("embed", "embed_out"),
                   init_std=self.compute.initializer_range, dtype=dtype, param_dtype=pdtype,
                   name="dense")(hidden[:, 0])
    return jnp.tanh(pooled)


# --- key/value cache helpers ----------------------------------------------------------------

# Rank of each cache variable in one layer; leading axes beyond it come from scans (`layers`).
_CACHE_RANKS = {"cached_key": 4, "cached_value": 4, "cached_mask": 2}


def init_cache(abstract_cache: Any) -> Any:
  """Zeroed cache from `jax.eval_shape` of a decode=True init (all cache variables start at 0)."""
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_cache)


def cache_batch_axes(cache: Any) -> Any:
  """A pytree like `cache` giving each leaf's batch axis (None: shared by all rows).

  cached_key/value/mask have the batch right after any scanned axes (axis 1 under Encoder's
  scan); cache_index is shared; other leaves (a family's own cache entries) are taken as batch-
  leading, or shared when scalar. What decoding.beam_search needs to reorder a cache by beam.
  """
  def axis(path, leaf):
    name = getattr(path[-1], "key", None) if path else None
    if name in _CACHE_RANKS:
      return leaf.ndim - _CACHE_RANKS[name]
    return None if name == "cache_index" or leaf.ndim == 0 else 0
  return jax.tree_util.tree_map_with_path(axis, cache)
