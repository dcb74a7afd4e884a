"""flava_jax: FLAVA (image, text and multimodal encoders, five pretraining objectives) in JAX/Flax.

The public entry points for notebooks and scripts:

    import flava_jax
    model, params = flava_jax.from_transformers("path/to/flava-full")
    emb = model.apply({"params": params}, pixels_nhwc, method="image_embedding")
"""

from flava_jax.convert import (
    ConversionError, dvae_from_transformers, from_transformers, to_transformers)
from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE, init_dvae_params, map_pixels, unmap_pixels
from flava_jax.models.flava import FlavaModel, FlavaOutput, init_params, logical_axes

__all__ = [
    "ConversionError", "DVAE", "DVAEConfig", "FlavaConfig", "FlavaModel", "FlavaOutput",
    "dvae_from_transformers", "from_transformers", "init_dvae_params", "init_params",
    "logical_axes", "map_pixels", "to_transformers", "unmap_pixels",
]
__version__ = "0.1.0"
