"""A wav2vec 2.0-style audio encoder from raw 16 kHz waveforms, on the shared layers.

    model = AudioEncoder(AudioConfig(...), compute)
    out = model.apply({"params": params}, waveform, sample_mask)   # waveform [B, N] float
    out["hidden"]      [B, F, D]  the transformer's output (F frames, one per 20 ms at 16 kHz)
    out["frame_mask"]  [B, F]     True for frames of real samples
    out["features"]    [B, F, C]  the convolutional features after their LayerNorm (the
                                  stopped-gradient targets of masked-audio objectives)
    out["layers"]      [L+1, B, F, D]  the transformer's input, then every block's output

Parts (transformers' Wav2Vec2Model with do_stable_layer_norm=False, wav2vec2-base's layout):
  feature_encoder  7 Conv1d layers (512 channels, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2,
                   no bias), GELU after each; feat_extract_norm="group": a GroupNorm with one
                   group per channel after the first conv only; "layer": a LayerNorm over the
                   channels after every conv
  projection       LayerNorm over the channels, then a dense layer to the model width
  masked_embed     the vector masked frames are replaced with (mask_time), SpecAugment / MAM
  pos_conv         a grouped Conv1d (kernel 128, 16 groups, padding 64, the last frame dropped)
                   with weight normalisation over the kernel axis (weight = g * v / |v|, g and
                   v stored as transformers stores them), GELU; added to the frames
  norm             LayerNorm, then the post-LN transformer blocks (BERT's layout)
Padding: frames of padded samples are zeroed before the positional convolution and are not
attended to, as transformers does given an attention mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax.models.config import ComputeConfig, EncoderConfig
from flava_jax.models.transformer import (
    ACT_EMBED, BATCH, LENGTH, Dense, Encoder, LayerNorm, constrain, dtype_of, param_with_axes)

Array = jax.Array
FEATURE_NORMS = ("group", "layer")


@dataclasses.dataclass(frozen=True)
class AudioConfig(EncoderConfig):
  """wav2vec 2.0 base by default (LayerNorm eps 1e-5 throughout)."""

  layer_norm_eps: float = 1e-5
  conv_dim: tuple = (512,) * 7
  conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  sample_rate: int = 16_000

  @classmethod
  def from_dict(cls, values: Any, prefix: str = "audio") -> "AudioConfig":
    """Validated config of a mapping (lists become tuples); bad fields name `prefix`."""
    from flava_jax.parse import dataclass_from_dict  # pylint: disable=import-outside-toplevel
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      if isinstance(values.get(name), (list, tuple)):
        values[name] = tuple(values[name])
    config = dataclass_from_dict(cls, values, prefix)
    config.validate(prefix)
    return config

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0:
      raise ValueError(f"{prefix}.conv_dim, conv_kernel and conv_stride must have one entry per "
                       f"conv layer; got {len(self.conv_dim)}, {len(self.conv_kernel)} and "
                       f"{len(self.conv_stride)}")
    if self.feat_extract_norm not in FEATURE_NORMS:
      raise ValueError(f"{prefix}.feat_extract_norm={self.feat_extract_norm!r}: use one of "
                       f"{FEATURE_NORMS}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                       f"{prefix}.num_conv_pos_embedding_groups="
                       f"{self.num_conv_pos_embedding_groups}")

  def frames(self, samples: int | Array) -> int | Array:
    """Frames the feature encoder makes of `samples` samples (0 when too few)."""
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      samples = (samples - kernel) // stride + 1
    return jnp.maximum(samples, 0) if isinstance(samples, jax.Array) else max(samples, 0)


def _conv(x: Array, kernel: Array, stride: int, padding) -> Array:
  """1-D convolution, channels last: x [B, T, C_in], kernel [K, C_in, C_out]."""
  return jax.lax.conv_general_dilated(x, kernel, (stride,), padding,
                                      dimension_numbers=("NWC", "WIO", "NWC"))


def _grouped_conv(x: Array, kernel: Array, padding, groups: int) -> Array:
  """A stride-1 grouped 1-D convolution as `groups` plain ones, concatenated: x [B, T, C],
  kernel [K, C / groups, C_out]. One convolution with feature_group_count gives the same values,
  but XLA's partitioner (jax 0.10, CPU) got its kernel gradient wrong when the batch is split
  over some mesh axes and replicated over another (a (2, 2, 2) mesh; tests/tasks/
  test_audio_text.py checks one)."""
  width, out = x.shape[-1] // groups, kernel.shape[-1] // groups
  parts = [_conv(x[..., g * width:(g + 1) * width], kernel[..., g * out:(g + 1) * out], 1,
                 padding) for g in range(groups)]
  return jnp.concatenate(parts, axis=-1)


class AudioEncoder(nn.Module):
  config: AudioConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, waveform: Array, sample_mask: Array | None = None,
               mask_time: Array | None = None) -> dict[str, Array]:
    """waveform [B, N] (float, 16 kHz); sample_mask [B, N] (1: a real sample) or None;
    mask_time [B, F] (True: replace the frame by masked_embed) or None."""
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
    std = compute.initializer_range
    x = waveform.astype(jnp.float32)[..., None]  # [B, N, 1]
    channels = 1
    for i, (dim, kernel, stride) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel,
                                                  cfg.conv_stride)):
      weight = self.param(f"conv{i}_kernel", param_with_axes(
          nn.initializers.he_normal(), (None, None, None)), (kernel, channels, dim), pdtype)
      x = _conv(x.astype(dtype), weight.astype(dtype), stride, "VALID")
      if cfg.conv_bias:
        x = x + self.param(f"conv{i}_bias", param_with_axes(nn.initializers.zeros, (None,)),
                           (dim,), pdtype).astype(dtype)
      if cfg.feat_extract_norm == "layer":
        x = LayerNorm(1e-5, dtype, pdtype, name=f"conv{i}_norm")(x)
      elif i == 0:  # GroupNorm, one group per channel: statistics over time
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=1, keepdims=True)
        scale = self.param("conv0_norm_scale", param_with_axes(nn.initializers.ones, (None,)),
                           (dim,), pdtype)
        bias = self.param("conv0_norm_bias", param_with_axes(nn.initializers.zeros, (None,)),
                          (dim,), pdtype)
        x = ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(dtype)
      x = jax.nn.gelu(x, approximate=False)
      channels = dim
    features = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="projection_norm")(x)
    x = Dense(cfg.hidden_size, (None, "embed"), init_std=std, dtype=dtype, param_dtype=pdtype,
              name="projection")(features)
    frames = x.shape[1]
    if sample_mask is None:
      frame_mask = jnp.ones(x.shape[:2], bool)
    else:
      lengths = cfg.frames(jnp.sum(sample_mask.astype(jnp.int32), axis=-1))
      frame_mask = jnp.arange(frames)[None, :] < lengths[:, None]
    masked_embed = self.param("masked_embed", param_with_axes(
        nn.initializers.uniform(1.0), ("embed",)), (cfg.hidden_size,), pdtype)
    if mask_time is not None:
      x = jnp.where(mask_time[..., None], masked_embed.astype(dtype), x)
    x = jnp.where(frame_mask[..., None], x, 0)

    groups, kernel = cfg.num_conv_pos_embedding_groups, cfg.num_conv_pos_embeddings
    g = self.param("pos_conv_g", param_with_axes(nn.initializers.ones, (None,)), (kernel,),
                   pdtype)
    v = self.param("pos_conv_v", param_with_axes(nn.initializers.normal(std), (None, None,
                                                                               "embed")),
                   (kernel, cfg.hidden_size // groups, cfg.hidden_size), pdtype)
    b = self.param("pos_conv_bias", param_with_axes(nn.initializers.zeros, ("embed",)),
                   (cfg.hidden_size,), pdtype)
    v32 = v.astype(jnp.float32)
    weight = v32 * (g.astype(jnp.float32) / jnp.sqrt(jnp.sum(jnp.square(v32), axis=(1, 2))))[
        :, None, None]
    pos = _grouped_conv(x.astype(dtype), weight.astype(dtype), [(kernel // 2, kernel // 2)],
                        groups)
    if kernel % 2 == 0:
      pos = pos[:, :-1]
    pos = jax.nn.gelu(pos + b.astype(dtype), approximate=False)
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm")(x + pos)
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    hidden, layers = Encoder(cfg, compute, norm_first=False, name="encoder")(
        x, frame_mask, every_layer=True)
    return {"hidden": hidden, "frame_mask": frame_mask, "features": features,
            "layers": jnp.concatenate([x[None], layers])}
