"""Typed, hashable model configurations.

Flax modules take these frozen dataclasses (hashable, so they can be module fields). The
ml_collections configs in configs/ mirror them field for field; `FlavaConfig.from_dict` turns a
ConfigDict (or a plain dict, e.g. a checkpoint's saved config) into one and rejects unknown or
ill-typed fields by name, so a wrong config fails at start-up rather than deep inside a trace.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

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

  def validate(self) -> "FlavaConfig":
    self.image.validate("model.image")
    self.text.validate("model.text")
    self.multimodal.validate("model.multimodal")
    check_choice("model.dtype", self.dtype, DTYPES)
    check_choice("model.param_dtype", self.param_dtype, DTYPES)
    check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
    if self.scan_unroll < 1:
      raise ValueError(f"model.scan_unroll must be >= 1, got {self.scan_unroll}")
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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


_T = TypeVar("_T")


def dataclass_from_dict(cls: type[_T], values: Mapping[str, Any], prefix: str) -> _T:
  """Builds dataclass `cls` from a mapping; unknown fields and wrong types are named errors."""
  if hasattr(values, "to_dict"):  # ml_collections.ConfigDict
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise TypeError(f"{prefix} must be a mapping, got {type(values).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"unknown field(s) {', '.join(prefix + '.' + u for u in unknown)}; "
        f"known fields of {prefix}: {', '.join(sorted(fields))}")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    path = f"{prefix}.{name}"
    if dataclasses.is_dataclass(hint):
      kwargs[name] = value if isinstance(value, hint) else dataclass_from_dict(hint, value, path)
      continue
    kwargs[name] = _coerce(path, value, hint)
  return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
  if hint is bool:
    if not isinstance(value, bool):
      raise TypeError(f"{path} must be a bool, got {value!r}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{path} must be an int, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError(f"{path} must be a number, got {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise TypeError(f"{path} must be a string, got {value!r}")
    return value
  return value
