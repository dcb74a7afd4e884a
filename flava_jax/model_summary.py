"""Builds the configured FLAVA and dVAE, checks one forward pass, writes the initial model.

This is what `python -m flava_jax.main` runs until the training loop lands: it validates the
config, prints the parameter budget of every component, runs the pretraining forward and the dVAE
tokenizer on a synthetic batch, and saves the randomly initialised model to WORKDIR/model (a
directory `python -m flava_jax.convert --to_transformers` accepts).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import checkpoint
from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE, init_dvae_params, map_pixels
from flava_jax.models.flava import FlavaModel, init_params


def num_parameters(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def count_parameters(params: Any) -> dict[str, int]:
  """Parameters per top-level component."""
  return {name: num_parameters(sub) for name, sub in params.items()}


def run(config: Any, workdir: str, batch_size: int = 2, text_length: int = 16) -> dict[str, Any]:
  """Returns a dict of what it measured (parameter counts, output shapes, code grid)."""
  model_config = FlavaConfig.from_dict(config.model)
  dvae_config = DVAEConfig.from_dict(config.dvae)
  model, dvae = FlavaModel(model_config), DVAE(dvae_config)
  rng = jax.random.key(config.seed)
  params = init_params(model, rng)
  counts = count_parameters(params)
  dvae_view = model_config.image.grid_size * dvae_config.downsample
  dvae_params = init_dvae_params(dvae, jax.random.fold_in(rng, 1), image_size=dvae_view)

  print(f"FLAVA ({config.get('variant', '?')}): {sum(counts.values()):,} parameters")
  for name, count in counts.items():
    print(f"  {name:<20s} {count:>14,}")
  dvae_count = num_parameters(dvae_params)
  print(f"dVAE tokenizer: {dvae_count:,} parameters (frozen during FLAVA pretraining)")

  data = np.random.default_rng(config.seed)
  size = model_config.image.image_size
  pixels = jnp.asarray(data.normal(size=(batch_size, size, size, 3)), jnp.float32)
  ids = jnp.asarray(data.integers(1, model_config.text.vocab_size, (batch_size, text_length)))
  lengths = np.where(np.arange(batch_size) % 2 == 0, text_length, text_length // 2)
  mask = jnp.asarray(np.arange(text_length)[None] < lengths[:, None])  # every other row padded
  masked_pos = jnp.asarray(data.random((batch_size, model_config.image.num_patches)) < 0.4)

  @jax.jit
  def forward(params, dvae_params, pixels, ids, mask, masked_pos):
    out = model.apply({"params": params}, pixels, ids, mask, bool_masked_pos=masked_pos)
    small = jax.image.resize(pixels, (pixels.shape[0], dvae_view, dvae_view, 3), "linear")
    codes = dvae.apply({"params": dvae_params}, map_pixels(jax.nn.sigmoid(small)),
                       method="tokens")
    return out, codes

  out, codes = forward(params, dvae_params, pixels, ids, mask, masked_pos)
  shapes = {name: tuple(getattr(out, name).shape) for name in
            ("image_embedding", "text_embedding", "itm_logits", "mmm_image_logits",
             "mmm_text_logits")}
  shapes["multimodal"] = tuple(out.multimodal_masked.last_hidden_state.shape)
  shapes["dvae_codes"] = tuple(codes.shape)
  for name, shape in shapes.items():
    print(f"  {name:<20s} {shape}")
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(out))
  if not finite:
    raise FloatingPointError("the forward pass produced NaN/Inf on a synthetic batch")
  if codes.shape[1] != model_config.image.num_patches:
    raise ValueError(f"the dVAE gives {codes.shape[1]} codes per image but the image encoder "
                     f"has {model_config.image.num_patches} patches")

  target = os.path.join(workdir, "model")
  if os.path.exists(os.path.join(target, checkpoint.MODEL_JSON)):
    print(f"{target} already holds a model; left as it is")
  else:
    checkpoint.save_model(target, model_config, params, dvae_config, dvae_params)
    print(f"initial model written to {target}")
  print("Pretraining itself (objectives, data pipeline, training loop) is not implemented yet.")
  return dict(parameters=counts, dvae_parameters=dvae_count, shapes=shapes)
