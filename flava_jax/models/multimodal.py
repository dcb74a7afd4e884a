"""Multimodal fusion encoder: [CLS_M] + projected image tokens + projected text tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax.models.config import FlavaConfig
from flava_jax.models.image import EncoderOutput
from flava_jax.models.transformer import (
    ACT_EMBED, BATCH, LENGTH, Dense, Encoder, LayerNorm, Pooler, constrain, dtype_of,
    param_with_axes)

Array = jax.Array


class MultimodalEncoder(nn.Module):
  """Fuses the unimodal encoders' PRE-final-LayerNorm hidden states.

  image_hidden: [B, 1+P, D_img], text_hidden: [B, L, D_txt], text_mask: [B, L] (1 = real token).
  Output sequences are [B, 1 + (1+P) + L, D_mm]: [CLS_M], image tokens (with CLS_I), text tokens.
  """

  model: FlavaConfig

  @nn.compact
  def __call__(self, image_hidden: Array, text_hidden: Array,
               text_mask: Array | None = None) -> EncoderOutput:
    cfg = self.model.multimodal
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    std = self.model.initializer_range
    image_tokens = Dense(cfg.hidden_size, ("embed", "embed_out"), init_std=std, dtype=dtype,
                         param_dtype=pdtype, name="image_to_mm")(image_hidden)
    text_tokens = Dense(cfg.hidden_size, ("embed", "embed_out"), init_std=std, dtype=dtype,
                        param_dtype=pdtype, name="text_to_mm")(text_hidden)
    cls_token = self.param(
        "cls_token", param_with_axes(nn.initializers.truncated_normal(std), ("embed",)),
        (cfg.hidden_size,), pdtype)
    batch = image_tokens.shape[0]
    cls = jnp.broadcast_to(cls_token.astype(dtype), (batch, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, image_tokens.astype(dtype), text_tokens.astype(dtype)], axis=1)
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    mask = None
    if text_mask is not None:
      image_mask = jnp.ones((batch, 1 + image_tokens.shape[1]), bool)
      mask = jnp.concatenate([image_mask, text_mask.astype(bool)], axis=1)
    hidden = Encoder(cfg, self.model.compute, name="encoder")(x, mask)
    last = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="final_norm")(hidden)
    pooled = Pooler(cfg.hidden_size, self.model.compute, name="pooler")(last)
    return EncoderOutput(last_hidden_state=last, hidden_state=hidden, pooled=pooled)
