"""flava_jax: FLAVA (image, text and multimodal encoders, five pretraining objectives) in JAX/Flax.

The public entry points for notebooks and scripts:

    import flava_jax
    model, params = flava_jax.from_transformers("path/to/flava-full")
    emb = model.apply({"params": params}, pixels_nhwc, method="image_embedding")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE, init_dvae_params, map_pixels, unmap_pixels
from flava_jax.models.flava import FlavaModel, FlavaOutput, init_params, logical_axes

if TYPE_CHECKING:
  from flava_jax.convert import (
      ConversionError, dvae_from_transformers, from_transformers, to_transformers)

# The converters are imported on first use: importing flava_jax.convert here would make
# `python -m flava_jax.convert` find the module already imported (runpy's RuntimeWarning).
_LAZY = {name: "flava_jax.convert" for name in (
    "ConversionError", "dvae_from_transformers", "from_transformers", "to_transformers")}


def __getattr__(name: str) -> Any:
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConversionError", "DVAE", "DVAEConfig", "FlavaConfig", "FlavaModel", "FlavaOutput",
    "dvae_from_transformers", "from_transformers", "init_dvae_params", "init_params",
    "logical_axes", "map_pixels", "to_transformers", "unmap_pixels",
]
__version__ = "0.1.0"
