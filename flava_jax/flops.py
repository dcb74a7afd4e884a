"""Analytic FLOP counts of the models' train steps (matmuls and convolutions; 2 FLOPs per MAC).

Used for TFLOP/s and MFU and checked against XLA's cost analysis by the AOT tool. Training a
trainable part costs 3x its forward (forward + two backward matmuls); the frozen dVAE only runs
forward. Rematerialisation adds recomputation that these numbers deliberately leave out (MFU
counts useful work).
"""

from __future__ import annotations

from typing import Any

from flava_jax.models.config import DVAEConfig, EncoderConfig, FlavaConfig, dvae_view_size


def encoder_flops(cfg: EncoderConfig, tokens: int) -> float:
  """Forward FLOPs of one example through a block stack of `tokens` tokens."""
  d, f, t = cfg.hidden_size, cfg.mlp_dim, tokens
  per_layer = (2 * t * d * 3 * d      # qkv
               + 2 * 2 * t * t * d    # scores and weighted values
               + 2 * t * d * d        # attention output
               + 2 * 2 * t * d * f)   # MLP
  return float(cfg.num_layers * per_layer)


def audio_encoder_flops(cfg: Any, samples: int) -> float:
  """Forward FLOPs of one row of `samples` samples through the audio encoder (models/audio.py:
  convolutions, projection, positional convolution, transformer)."""
  total, channels = 0.0, 1
  for dim, kernel, stride in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
    samples = (samples - kernel) // stride + 1
    total += 2 * samples * kernel * channels * dim
    channels = dim
  frames, width = samples, cfg.hidden_size
  total += 2 * frames * channels * width  # projection
  total += 2 * frames * cfg.num_conv_pos_embeddings * width * width // (
      cfg.num_conv_pos_embedding_groups)
  return total + encoder_flops(cfg, frames)


def image_encoder_flops(cfg: FlavaConfig) -> float:
  img = cfg.image
  patch = 2 * img.num_patches * img.patch_size**2 * img.num_channels * img.hidden_size
  return patch + encoder_flops(img, img.num_patches + 1)


def text_encoder_flops(cfg: FlavaConfig, length: int) -> float:
  return encoder_flops(cfg.text, length)


def head_flops(hidden: int, vocab: int, tokens: int) -> float:
  return float(2 * tokens * hidden * hidden + 2 * tokens * hidden * vocab)


def dvae_encoder_flops(cfg: DVAEConfig, image_size: int) -> float:
  """Forward FLOPs of the dVAE encoder on one image (the MIM/MMM target tokenizer)."""
  size, flops, width_in = image_size, 0.0, cfg.input_channels
  flops += 2 * size * size * 49 * width_in * cfg.hidden_size  # 7x7 input conv
  width_in = cfg.hidden_size
  for group in range(cfg.num_groups):
    width = cfg.hidden_size * 2**group
    hidden = width // 4
    for block in range(cfg.blocks_per_group):
      n_in = width_in if block == 0 else width
      if n_in != width:
        flops += 2 * size * size * n_in * width  # 1x1 identity path
      flops += 2 * size * size * 9 * (n_in * hidden + hidden * hidden + hidden * hidden)
      flops += 2 * size * size * hidden * width
    width_in = width
    if group < cfg.num_groups - 1:
      size //= 2
  flops += 2 * size * size * width_in * cfg.vocab_size  # 1x1 output conv
  return flops


def dvae_decoder_flops(cfg: DVAEConfig, image_size: int) -> float:
  """Forward FLOPs of the dVAE decoder producing one image of `image_size` pixels per side."""
  size = image_size // cfg.downsample
  flops = 2 * size * size * cfg.vocab_size * cfg.decoder_init_size  # 1x1 input conv
  width_in = cfg.decoder_init_size
  for group in range(cfg.num_groups):
    width = cfg.hidden_size * 2**(cfg.num_groups - 1 - group)
    hidden = width // 4
    for block in range(cfg.blocks_per_group):
      n_in = width_in if block == 0 else width
      if n_in != width:
        flops += 2 * size * size * n_in * width  # 1x1 identity path
      flops += 2 * size * size * (n_in * hidden + 9 * (hidden * hidden + hidden * hidden
                                                       + hidden * width))
    width_in = width
    if group < cfg.num_groups - 1:
      size *= 2
  flops += 2 * size * size * width_in * 2 * cfg.output_channels  # 1x1 output conv
  return float(flops)


def dvae_train_flops(cfg: DVAEConfig, image_size: int) -> float:
  """FLOPs of one training example of the dVAE: 3x the encoder and decoder forwards."""
  return 3.0 * (dvae_encoder_flops(cfg, image_size) + dvae_decoder_flops(cfg, image_size))


def train_flops_per_example(cfg: FlavaConfig, kind: str, text_length: int,
                            dvae: DVAEConfig | None = None, dvae_image_size: int = 0,
                            image_slots: int = 0, text_slots: int = 0) -> float:
  """FLOPs of one training example of batch kind paired | image | text.

  image_slots / text_slots: the positions the masked-prediction heads run on per row
  (loss.*_prediction_slots; 0: every patch / token).
  """
  img, mm = cfg.image, cfg.multimodal
  p = img.num_patches
  image_heads = image_slots or p
  text_heads = text_slots or text_length
  if kind == "paired":
    forward = (2 * image_encoder_flops(cfg)             # unmasked (GC) and masked (MMM, ITM)
               + 2 * text_encoder_flops(cfg, text_length)
               + 2 * (p + 1) * img.hidden_size * mm.hidden_size
               + 2 * text_length * cfg.text.hidden_size * mm.hidden_size
               + encoder_flops(mm, 2 + p + text_length)
               + head_flops(mm.hidden_size, img.vocab_size, image_heads)
               + head_flops(mm.hidden_size, cfg.text.vocab_size, text_heads)
               + 2 * mm.hidden_size * mm.hidden_size + 2 * mm.hidden_size * 2
               + 2 * (img.hidden_size + cfg.text.hidden_size) * cfg.projection_dim)
  elif kind == "image":
    forward = image_encoder_flops(cfg) + head_flops(img.hidden_size, img.vocab_size, image_heads)
  elif kind == "text":
    forward = (text_encoder_flops(cfg, text_length)
               + head_flops(cfg.text.hidden_size, cfg.text.vocab_size, text_heads))
  else:
    raise ValueError(f"unknown batch kind {kind!r}")
  total = 3 * forward
  if kind != "text" and dvae is not None:
    total += dvae_encoder_flops(dvae, dvae_image_size)
  return total


def contrastive_flops(cfg: FlavaConfig, global_batch: int) -> float:
  """The [B, B] similarity matrices of the global contrastive loss (both directions, fwd+bwd)."""
  return 3 * 2 * 2 * global_batch * global_batch * cfg.projection_dim


# Dense bf16 peak per device, by the start of jax's device_kind (lower case). MFU is reported
# against these; devices not listed (CPUs) get no MFU.
PEAK_FLOPS = {"tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
              "tpu v6 lite": 918e12, "nvidia h100": 989e12, "nvidia h200": 989e12,
              "nvidia a100": 312e12}


def peak_flops_per_device(device) -> float | None:
  kind = getattr(device, "device_kind", "").lower()
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def train_step_flops(cfg: FlavaConfig, dvae: DVAEConfig, kind: str, global_batch: int,
                     text_length: int, image_slots: int = 0, text_slots: int = 0) -> float:
  """Analytic FLOPs of one train step of batch kind `kind` (the whole global batch)."""
  total = global_batch * train_flops_per_example(cfg, kind, text_length, dvae,
                                                 dvae_view_size(cfg.image, dvae), image_slots,
                                                 text_slots)
  if kind == "paired":
    total += contrastive_flops(cfg, global_batch)
  return total
