"""FLAVA's prediction heads. Each takes hidden states and returns float32 logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax.models.config import FlavaConfig
from flava_jax.models.transformer import (
    ACT_EMBED, ACT_VOCAB, BATCH, LENGTH, Dense, LayerNorm, Pooler, constrain, dtype_of)

Array = jax.Array


def take_positions(hidden: Array, positions: Array | None) -> Array:
  """hidden [B, T, D] at positions [B, K] (ints in [0, T)) -> [B, K, D]; None keeps all T.

  The prediction heads run on the K positions that carry labels (a static count per row, so
  shapes stay static) instead of all T: the vocabulary projection is the costly part of a head.
  """
  if positions is None:
    return hidden
  picked = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
  return constrain(picked, (BATCH, LENGTH, ACT_EMBED))


class MaskedPredictionHead(nn.Module):
  """dense -> GELU -> LayerNorm -> decoder (with bias) to `vocab_size` logits.

  Used four times, untied: MIM (dVAE codes), MLM (WordPiece ids), MMM-image, MMM-text; and, with
  classes for a vocabulary, as the fine-tuning classifier (models/classifier.py). Accepts any
  [..., D] input, so callers may pass whole sequences or only the positions that carry labels.
  """

  hidden_size: int
  vocab_size: int
  layer_norm_eps: float
  model: FlavaConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    std = self.model.initializer_range
    h = Dense(self.hidden_size, ("embed", "embed_out"), init_std=std, dtype=dtype,
              param_dtype=pdtype, name="transform")(hidden)
    h = jax.nn.gelu(h, approximate=False)
    h = LayerNorm(self.layer_norm_eps, dtype, pdtype, name="norm")(h)
    logits = Dense(self.vocab_size, ("embed", "vocab"), init_std=std, dtype=dtype,
                   param_dtype=pdtype, name="decoder")(h)
    # [B, T, V] or [N, V]: the leading axis is the (sharded) batch, never replicated here.
    names = (BATCH,) + (LENGTH,) * (logits.ndim - 2) + (ACT_VOCAB,)
    return constrain(logits.astype(jnp.float32), names)


class ITMHead(nn.Module):
  """Image-text matching: pooler (dense + tanh) on [CLS_M], then a 2-way classifier."""

  hidden_size: int
  model: FlavaConfig

  @nn.compact
  def __call__(self, multimodal_hidden: Array) -> Array:
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    pooled = Pooler(self.hidden_size, self.model.compute, name="pooler")(multimodal_hidden)
    logits = Dense(2, ("embed", "classes"), init_std=self.model.initializer_range, dtype=dtype,
                   param_dtype=pdtype, name="classifier")(pooled)
    return logits.astype(jnp.float32)
