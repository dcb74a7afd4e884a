"""Typed, hashable model configurations.

Flax modules take these frozen dataclasses (hashable, so they can be module fields). The
ml_collections configs in configs/ mirror them field for field; `FlavaConfig.from_dict` turns a
ConfigDict (or a plain dict, e.g. a checkpoint's saved config) into one and rejects unknown or
ill-typed fields by name, so a wrong config fails at start-up rather than deep inside a trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flava_jax.parse import check_choice, dataclass_from_dict

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A stack of pre-LayerNorm transformer blocks (shared by all three encoders)."""

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def validate(self, prefix: str) -> None:
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
          f"{prefix}.num_heads={self.num_heads}")
    for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ImageConfig(EncoderConfig):
  """ViT image encoder. `vocab_size` is the dVAE codebook size predicted by MIM/MMM-image."""

  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  vocab_size: int = 8192

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    if self.image_size % self.patch_size:
      raise ValueError(
          f"{prefix}.image_size={self.image_size} is not a multiple of "
          f"{prefix}.patch_size={self.patch_size}")


@dataclasses.dataclass(frozen=True)
class TextConfig(EncoderConfig):
  """Text encoder: same blocks as the image encoder, BERT-style embeddings."""

  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0


@dataclasses.dataclass(frozen=True)
class MultimodalConfig(EncoderConfig):
  num_layers: int = 6


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """How the shared layers compute (dtypes, attention kernel, remat, scan unrolling, init scale).

  Kept apart from any family's config so that the layers in models/transformer.py serve FLAVA,
  BLIP and later families alike; FlavaConfig.compute builds one from FlavaConfig's own fields.
  """

  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_unroll: int = 1
  initializer_range: float = 0.02

  def validate(self, prefix: str) -> "ComputeConfig":
    check_choice(f"{prefix}.dtype", self.dtype, DTYPES)
    check_choice(f"{prefix}.param_dtype", self.param_dtype, DTYPES)
    check_choice(f"{prefix}.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_choice(f"{prefix}.remat_policy", self.remat_policy, REMAT_POLICIES)
    if self.scan_unroll < 1:
      raise ValueError(f"{prefix}.scan_unroll must be >= 1, got {self.scan_unroll}")
    return self


def compute_of(config: Any) -> ComputeConfig:
  """The ComputeConfig of a family's config holding the same-named fields (dtype, param_dtype,
  attention_impl, remat_policy, scan_unroll, initializer_range)."""
  return ComputeConfig(dtype=config.dtype, param_dtype=config.param_dtype,
                       attention_impl=config.attention_impl, remat_policy=config.remat_policy,
                       scan_unroll=config.scan_unroll, initializer_range=config.initializer_range)


@dataclasses.dataclass(frozen=True)
class FlavaConfig:
  """The whole FLAVA model: three encoders, contrastive projections and pretraining heads.

  dtype is the compute dtype; parameters are always kept in param_dtype (float32). LayerNorm
  statistics, softmax and logits are computed in float32 whatever dtype says.
  """

  image: ImageConfig = ImageConfig()
  text: TextConfig = TextConfig()
  multimodal: MultimodalConfig = MultimodalConfig()
  projection_dim: int = 768
  logit_scale_init: float = 2.6592
  # False for a FlavaModel-style backbone (encoders + projections, no MIM/MLM/ITM/MMM heads).
  pretraining_heads: bool = True
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  # "xla": portable einsum attention; "cudnn": cuDNN flash attention (GPU only, requires
  # right-padded masks); "splash": Pallas splash attention (TPU only; models/splash.py);
  # "auto": cudnn on GPUs in bfloat16/float16 compute, xla elsewhere.
  attention_impl: str = "xla"
  # Rematerialisation of each transformer block: none | full | dots | dots_no_batch.
  remat_policy: str = "none"
  # Layers per iteration of the scanned stacks (1: a loop over layers; >= num_layers: straight-
  # line code, longer to compile, which XLA's cost analysis counts in full).
  scan_unroll: int = 1

  @property
  def compute(self) -> ComputeConfig:
    """The compute settings the shared transformer layers take."""
    return compute_of(self)

  def validate(self) -> "FlavaConfig":
    self.image.validate("model.image")
    self.text.validate("model.text")
    self.multimodal.validate("model.multimodal")
    self.compute.validate("model")
    if self.projection_dim <= 0:
      raise ValueError(f"model.projection_dim must be positive, got {self.projection_dim}")
    return self

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "FlavaConfig":
    return dataclass_from_dict(cls, values, "model").validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes: Any) -> "FlavaConfig":
    return dataclasses.replace(self, **changes).validate()


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
  """DALL-E discrete VAE (the image tokenizer). Four groups of residual blocks.

  hidden_size is the base width (256 in DALL-E): group widths are 1x, 2x, 4x, 8x of it.
  decoder=False builds the encoder only (what FlavaImageCodebook holds).
  """

  hidden_size: int = 256
  num_groups: int = 4
  blocks_per_group: int = 2
  vocab_size: int = 8192
  input_channels: int = 3
  decoder: bool = True
  decoder_init_size: int = 128
  output_channels: int = 3
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def num_layers(self) -> int:
    return self.num_groups * self.blocks_per_group

  @property
  def downsample(self) -> int:
    return 2**(self.num_groups - 1)

  def validate(self) -> "DVAEConfig":
    if self.num_groups != 4:
      raise ValueError(f"dvae.num_groups must be 4 (the DALL-E layout), got {self.num_groups}")
    if self.hidden_size % 4:
      raise ValueError(f"dvae.hidden_size must be a multiple of 4, got {self.hidden_size}")
    for name in ("blocks_per_group", "vocab_size", "input_channels", "decoder_init_size",
                 "output_channels"):
      if getattr(self, name) <= 0:
        raise ValueError(f"dvae.{name} must be positive, got {getattr(self, name)}")
    check_choice("dvae.dtype", self.dtype, DTYPES)
    check_choice("dvae.param_dtype", self.param_dtype, DTYPES)
    return self

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "DVAEConfig":
    return dataclass_from_dict(cls, values, "dvae").validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def dvae_view_size(image: ImageConfig, dvae: DVAEConfig) -> int:
  """Pixels per side of the dVAE's view: one code per image patch (FLAVA: 14 x 8 = 112)."""
  return image.grid_size * dvae.downsample
