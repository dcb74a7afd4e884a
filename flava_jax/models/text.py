"""Text encoder: word + position + token-type embeddings, LayerNorm, the shared block stack."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax.models.config import FlavaConfig
from flava_jax.models.image import EncoderOutput
from flava_jax.models.transformer import (
    ACT_EMBED, BATCH, LENGTH, Encoder, LayerNorm, Pooler, constrain, dtype_of, param_with_axes)

Array = jax.Array


class TextEmbeddings(nn.Module):
  model: FlavaConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array | None) -> Array:
    cfg = self.model.text
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(
          f"text length {length} exceeds model.text.max_position_embeddings="
          f"{cfg.max_position_embeddings}")
    init = nn.initializers.normal(self.model.initializer_range)
    words = self.param("word_embed", param_with_axes(init, ("vocab", "embed")),
                       (cfg.vocab_size, cfg.hidden_size), pdtype)
    positions = self.param("position_embed", param_with_axes(init, ("position", "embed")),
                           (cfg.max_position_embeddings, cfg.hidden_size), pdtype)
    token_types = self.param("token_type_embed", param_with_axes(init, ("token_type", "embed")),
                             (cfg.type_vocab_size, cfg.hidden_size), pdtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (jnp.take(words, input_ids, axis=0) + jnp.take(token_types, token_type_ids, axis=0)
         + positions[None, :length])
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm")(x)
    return constrain(x, (BATCH, LENGTH, ACT_EMBED))


class TextEncoder(nn.Module):
  model: FlavaConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None) -> EncoderOutput:
    cfg = self.model.text
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    x = TextEmbeddings(self.model, name="embeddings")(input_ids, token_type_ids)
    mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden = Encoder(cfg, self.model.compute, name="encoder")(x, mask)
    last = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="final_norm")(hidden)
    pooled = Pooler(cfg.hidden_size, self.model.compute, name="pooler")(last)
    return EncoderOutput(last_hidden_state=last, hidden_state=hidden, pooled=pooled)
