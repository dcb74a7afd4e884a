"""The DALL-E discrete VAE: FLAVA's image tokenizer (MIM/MMM-image targets).

Encoder: 7x7 conv, four groups of residual blocks (widths 1x, 2x, 4x, 8x hidden_size), 2x2 max-pool
after groups 1-3, ReLU + 1x1 conv to vocab_size logits; tokens are the argmax. The decoder mirrors
it with nearest-neighbour 2x upsampling and predicts 2 * output_channels maps (logit-Laplace
location and log-scale). NHWC throughout. Inputs are pixels in [0, 1] already mapped by
`map_pixels` (x -> 0.8 x + 0.1), as the data pipeline prepares the dVAE view.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax import run_once
from flava_jax.models.config import DVAEConfig
from flava_jax.models.transformer import dtype_of

Array = jax.Array

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Array) -> Array:
  """[0, 1] pixels -> the dVAE's input range [eps, 1 - eps]."""
  return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: Array) -> Array:
  return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv(nn.Module):
  """Same-padded stride-1 convolution with logical axis names on its kernel."""

  features: int
  kernel_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, pad = self.kernel_size, self.kernel_size // 2
    dtype, pdtype = dtype_of(self.dtype), dtype_of(self.param_dtype)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                                     ("conv_h", "conv_w", "conv_in", "conv_out")),
        (k, k, x.shape[-1], self.features), pdtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), pdtype)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(dtype)


class ResBlock(nn.Module):
  """id_path(x) + post_gain * res_path(x). The res path's kernel sizes differ between encoder
  (3, 3, 3, 1) and decoder (1, 3, 3, 3)."""

  features: int
  num_layers: int
  kernel_sizes: tuple[int, int, int, int]
  config: DVAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    hidden = self.features // 4
    identity = x
    if x.shape[-1] != self.features:
      identity = Conv(self.features, 1, cfg.dtype, cfg.param_dtype, name="id_path")(x)
    widths = (hidden, hidden, hidden, self.features)
    h = x
    for i, (width, k) in enumerate(zip(widths, self.kernel_sizes)):
      h = Conv(width, k, cfg.dtype, cfg.param_dtype, name=f"res_conv_{i + 1}")(nn.relu(h))
    return identity + (1.0 / self.num_layers**2) * h


class DVAEEncoder(nn.Module):
  config: DVAEConfig

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """[B, H, W, C] mapped pixels -> [B, H/8, W/8, vocab_size] float32 logits."""
    cfg = self.config
    x = Conv(cfg.hidden_size, 7, cfg.dtype, cfg.param_dtype, name="input")(
        pixels.astype(dtype_of(cfg.dtype)))
    for group in range(cfg.num_groups):
      width = cfg.hidden_size * 2**group
      for block in range(cfg.blocks_per_group):
        x = ResBlock(width, cfg.num_layers, (3, 3, 3, 1), cfg,
                     name=f"group_{group + 1}_block_{block + 1}")(x)
      if group < cfg.num_groups - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    logits = Conv(cfg.vocab_size, 1, cfg.dtype, cfg.param_dtype, name="output")(nn.relu(x))
    return logits.astype(jnp.float32)


class DVAEDecoder(nn.Module):
  config: DVAEConfig

  @nn.compact
  def __call__(self, codes: Array) -> Array:
    """[B, h, w, vocab_size] one-hot or relaxed codes -> [B, 8h, 8w, 2*out_channels] stats."""
    cfg = self.config
    x = Conv(cfg.decoder_init_size, 1, cfg.dtype, cfg.param_dtype, name="input")(
        codes.astype(dtype_of(cfg.dtype)))
    for group in range(cfg.num_groups):
      width = cfg.hidden_size * 2**(cfg.num_groups - 1 - group)
      for block in range(cfg.blocks_per_group):
        x = ResBlock(width, cfg.num_layers, (1, 3, 3, 3), cfg,
                     name=f"group_{group + 1}_block_{block + 1}")(x)
      if group < cfg.num_groups - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
    stats = Conv(2 * cfg.output_channels, 1, cfg.dtype, cfg.param_dtype, name="output")(
        nn.relu(x))
    return stats.astype(jnp.float32)


class DVAE(nn.Module):
  """Encoder (+ decoder when config.decoder). Methods: logits, tokens, decode, reconstruct."""

  config: DVAEConfig

  def setup(self):
    self.encoder = DVAEEncoder(self.config)
    if self.config.decoder:
      self.decoder = DVAEDecoder(self.config)

  def logits(self, pixels: Array) -> Array:
    return self.encoder(pixels)

  def tokens(self, pixels: Array) -> Array:
    """[B, H, W, C] mapped pixels -> [B, H/8 * W/8] int32 codes (row-major), the MIM targets."""
    logits = self.encoder(pixels)
    return jnp.argmax(logits, axis=-1).reshape(logits.shape[0], -1).astype(jnp.int32)

  def decode(self, codes: Array) -> Array:
    """[B, h, w, vocab] (one-hot or soft) -> [B, 8h, 8w, 2*C]: logit-Laplace (mu, log b)."""
    if not self.config.decoder:
      raise ValueError("this dVAE was built without a decoder (dvae.decoder=False); "
                       "transformers' FlavaImageCodebook holds the encoder only")
    return self.decoder(codes)

  def reconstruct(self, tokens: Array, grid: tuple[int, int]) -> Array:
    """[B, h*w] codes -> [B, 8h, 8w, C] pixels in [0, 1] (the mean of the logit-Laplace)."""
    one_hot = jax.nn.one_hot(tokens.reshape(tokens.shape[0], *grid), self.config.vocab_size)
    stats = self.decode(one_hot)
    return unmap_pixels(jax.nn.sigmoid(stats[..., :self.config.output_channels]))

  def __call__(self, pixels: Array) -> Array:
    """Init/convenience: logits, and the decoder on their softmax when present."""
    logits = self.encoder(pixels)
    if self.config.decoder:
      return self.decoder(jax.nn.softmax(logits, axis=-1))
    return logits


def init_dvae_params(model: DVAE, rng: Array, image_size: int = 32, boxed: bool = False):
  pixels = jnp.zeros((1, image_size, image_size, model.config.input_channels), jnp.float32)
  params = run_once.jit(model.init)(rng, pixels)["params"]
  return params if boxed else nn.meta.unbox(params)
