"""ViT image encoder: patch embedding, [CLS_I], learned [MASK] patch, position embeddings."""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax.models.config import FlavaConfig
from flava_jax.models.transformer import (
    ACT_EMBED, BATCH, LENGTH, Encoder, LayerNorm, Pooler, constrain, dtype_of, param_with_axes)

Array = jax.Array


@flax.struct.dataclass
class EncoderOutput:
  """What a unimodal or multimodal encoder returns.

  last_hidden_state: final LayerNorm applied, [B, T, D] (what users and the heads consume).
  hidden_state: the last block's output before the final LayerNorm, [B, T, D] (what the
    multimodal encoder consumes; transformers calls it hidden_states[-1]).
  pooled: the encoder's own pooler (dense + tanh on token 0), [B, D].
  """

  last_hidden_state: Array
  hidden_state: Array
  pooled: Array


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of PyTorch's bicubic resize (A=-0.75, align_corners=False, no antialias).

  Resizing a grid with it (rows then columns) reproduces torch.nn.functional.interpolate(...,
  mode="bicubic"), which is how the reference interpolates position embeddings.
  """
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for dst in range(out_size):
    src = scale * (dst + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for offset, weight in zip(range(-1, 3), weights):
      matrix[dst, min(max(base + offset, 0), in_size - 1)] += weight
  return matrix.astype(np.float32)


def interpolate_positions(pos_embed: Array, grid_h: int, grid_w: int) -> Array:
  """Resizes [1 + g*g, D] position embeddings (CLS first) to a grid_h x grid_w patch grid."""
  num_positions = pos_embed.shape[0] - 1
  old = int(round(num_positions**0.5))
  if old * old != num_positions:
    raise ValueError(f"position embeddings of {num_positions} patches are not a square grid")
  if (grid_h, grid_w) == (old, old):
    return pos_embed
  grid = pos_embed[1:].reshape(old, old, -1).astype(jnp.float32)
  rows, cols = bicubic_matrix(old, grid_h), bicubic_matrix(old, grid_w)
  grid = jnp.einsum("ij,jkd->ikd", rows, grid, precision=jax.lax.Precision.HIGHEST)
  grid = jnp.einsum("lk,ikd->ild", cols, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:1], grid.reshape(grid_h * grid_w, -1).astype(pos_embed.dtype)])


class ImageEmbeddings(nn.Module):
  """Patchify -> linear (the stride-p conv), masked patches -> [MASK], prepend [CLS_I], + positions.

  `model` is any config with FlavaConfig's image, dtype, param_dtype and initializer_range
  fields (BLIP's too); mask_token=False builds no [MASK] patch (a ViT that never masks).
  """

  model: FlavaConfig
  mask_token: bool = True

  @nn.compact
  def __call__(self, pixel_values: Array, bool_masked_pos: Array | None) -> Array:
    cfg = self.model.image
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    batch, height, width, channels = pixel_values.shape
    p = cfg.patch_size
    if height % p or width % p or channels != cfg.num_channels:
      raise ValueError(
          f"pixel_values of shape {pixel_values.shape} (NHWC) do not fit patch_size={p} and "
          f"num_channels={cfg.num_channels}")
    grid_h, grid_w = height // p, width // p
    std = self.model.initializer_range
    kernel = self.param(
        "patch_kernel",
        param_with_axes(nn.initializers.normal(std), ("patch_h", "patch_w", "channels", "embed")),
        (p, p, cfg.num_channels, cfg.hidden_size), pdtype)
    patch_bias = self.param("patch_bias", param_with_axes(nn.initializers.zeros, ("embed",)),
                            (cfg.hidden_size,), pdtype)
    tokens_init = param_with_axes(nn.initializers.truncated_normal(std), ("embed",))
    cls_token = self.param("cls_token", tokens_init, (cfg.hidden_size,), pdtype)
    mask_token = (self.param("mask_token", tokens_init, (cfg.hidden_size,), pdtype)
                  if self.mask_token else None)
    pos_embed = self.param(
        "pos_embed",
        param_with_axes(nn.initializers.truncated_normal(std), ("position", "embed")),
        (cfg.num_patches + 1, cfg.hidden_size), pdtype)

    patches = pixel_values.astype(dtype).reshape(batch, grid_h, p, grid_w, p, channels)
    embeddings = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(dtype))
    embeddings = embeddings.reshape(batch, grid_h * grid_w, cfg.hidden_size)
    embeddings = embeddings + patch_bias.astype(dtype)
    if bool_masked_pos is not None:
      if mask_token is None:
        raise ValueError("bool_masked_pos given to image embeddings built without a [MASK] token")
      masked = bool_masked_pos.reshape(batch, -1)[..., None].astype(dtype)  # [B, P, 1]
      embeddings = embeddings * (1 - masked) + mask_token.astype(dtype) * masked
    cls = jnp.broadcast_to(cls_token.astype(dtype), (batch, 1, cfg.hidden_size))
    embeddings = jnp.concatenate([cls, embeddings], axis=1)
    positions = interpolate_positions(pos_embed, grid_h, grid_w)
    return constrain(embeddings + positions.astype(dtype), (BATCH, LENGTH, ACT_EMBED))


class ImageEncoder(nn.Module):
  model: FlavaConfig

  @nn.compact
  def __call__(self, pixel_values: Array, bool_masked_pos: Array | None = None) -> EncoderOutput:
    cfg = self.model.image
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    x = ImageEmbeddings(self.model, name="embeddings")(pixel_values, bool_masked_pos)
    hidden = Encoder(cfg, self.model.compute, name="encoder")(x, None)
    last = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="final_norm")(hidden)
    pooled = Pooler(cfg.hidden_size, self.model.compute, name="pooler")(last)
    return EncoderOutput(last_hidden_state=last, hidden_state=hidden, pooled=pooled)
