"""A tiny causal language model built from the shared layers, for the decoder tests.

Token + position embeddings, a causal Encoder (optionally cross-attending to an encoder sequence,
optionally post-LN), a final LayerNorm and a vocabulary projection; plus the step functions that
models/decoding.py takes, through the key/value cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax.models import transformer
from flava_jax.models.config import ComputeConfig, EncoderConfig

Array = jax.Array
VOCAB, MAX_POSITIONS, ENCODER_WIDTH = 13, 16, 12


class TinyLM(nn.Module):
  config: EncoderConfig
  compute: ComputeConfig
  cross_attention: bool = False
  norm_first: bool = True

  @nn.compact
  def __call__(self, tokens: Array, mask: Array | None = None,
               encoder_hidden: Array | None = None, encoder_mask: Array | None = None, *,
               decode: bool = False) -> Array:
    """tokens [B, T] -> float32 logits [B, T, VOCAB]."""
    cfg = self.config
    init = nn.initializers.normal(0.5)
    embed = self.param("embed", init, (VOCAB, cfg.hidden_size))
    positions = self.param("positions", init, (MAX_POSITIONS, cfg.hidden_size))
    start = jnp.zeros((), jnp.int32)
    if decode:  # the model's own position counter, next to the layers' caches
      counting = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if counting:
        start = position.value
        position.value = start + tokens.shape[1]
    x = embed[tokens] + jax.lax.dynamic_slice_in_dim(positions, start, tokens.shape[1])
    x = transformer.Encoder(cfg, self.compute, causal=True, cross_attention=self.cross_attention,
                            norm_first=self.norm_first, name="decoder")(
                                x, mask, encoder_hidden, encoder_mask, decode=decode)
    x = transformer.LayerNorm(cfg.layer_norm_eps, name="final_norm")(x)
    logits = transformer.Dense(VOCAB, ("embed", "vocab"), init_std=0.3, name="lm_head")(x)
    return logits.astype(jnp.float32)


def make_model(cross_attention: bool = False, norm_first: bool = True, remat: str = "none",
               unroll: int = 1) -> TinyLM:
  config = EncoderConfig(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                         layer_norm_eps=1e-6)
  compute = ComputeConfig(initializer_range=0.3, remat_policy=remat, scan_unroll=unroll)
  return TinyLM(config, compute, cross_attention, norm_first)


def encoder_inputs(batch: int, length: int = 5, seed: int = 1) -> tuple[Array, Array]:
  """Random encoder states [B, S, ENCODER_WIDTH] and a right-padded mask (row i has S - i keys)."""
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((batch, length, ENCODER_WIDTH)), jnp.float32)
  lengths = np.maximum(length - np.arange(batch), 1)
  return hidden, jnp.asarray(np.arange(length)[None] < lengths[:, None])


def random_params(abstract: Any, seed: int = 0) -> Any:
  """Random values for (possibly boxed) abstract parameters, drawn with numpy: compiling flax's
  initializers costs seconds on CPU, which these tests need not spend."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    values = rng.normal(0.0, 0.3, leaf.shape)
    if path[-1].key == "scale":  # LayerNorm scales near 1
      values = 1.0 + values / 3
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def init_params(model: TinyLM, batch: int, length: int, cross: tuple | None = None,
                seed: int = 0) -> Any:
  tokens = jnp.zeros((batch, length), jnp.int32)
  return random_params(jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, None, *(cross or (None, None)))["params"]),
      seed)


def empty_cache(model: TinyLM, batch: int, max_length: int, cross: tuple | None = None) -> Any:
  """A zeroed cache for `max_length` positions (shapes from a decode=True init, never run)."""
  tokens = jnp.zeros((batch, max_length), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), tokens, None, *(cross or (None, None)), decode=True)["cache"])
  return transformer.init_cache(abstract)


def cached_step_fns(model: TinyLM, params: Any):
  """(prefill_fn, logits_fn) over state {"cache", and for the prefill "encoder", "encoder_mask"}."""

  def run(tokens, cache, encoder_hidden=None, encoder_mask=None):
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, None,
                                    encoder_hidden, encoder_mask, decode=True, mutable=["cache"])
    return logits[:, -1], {"cache": variables["cache"]}

  def prefill_fn(tokens, state):
    return run(tokens, state["cache"], state.get("encoder"), state.get("encoder_mask"))

  def logits_fn(tokens, state):
    return run(tokens, state["cache"])

  return prefill_fn, logits_fn

