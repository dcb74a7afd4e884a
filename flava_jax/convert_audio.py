"""Converters between transformers' Wav2Vec2Model and flava_jax's audio encoder (models/audio.py).

    config, params = from_transformers("wav2vec2-base")     # a save_pretrained directory
    to_transformers(config, params, "out")                  # Wav2Vec2Model.from_pretrained("out")

wav2vec2-base's layout (do_stable_layer_norm=False: post-LN blocks). Every weight is accounted
for as in flava_jax.convert: unknown, missing and misshapen weights are ConversionErrors naming
them; conversions are transposes and reshapes, so round trips are bit-exact. The positional
convolution's weight normalisation is kept as transformers stores it (g and v), and so is
masked_spec_embed (our masked_embed). A checkpoint without masked_spec_embed (a config with
SpecAugment off) is an error naming it: our encoder always has the vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flava_jax import transformers_io
from flava_jax.convert import (
    _LINEAR, ConversionError, _gather, _linear, _norm, _out_kernel, _qkv_bias, _qkv_kernel, _Rule,
    _scatter, _Transform, check_params)
from flava_jax.models.audio import AudioConfig, AudioEncoder
from flava_jax.models.config import ComputeConfig

# torch Conv1d [out, in, K] <-> ours [K, in, out]
_CONV1D = _Transform(lambda a: a[0].transpose(2, 1, 0), lambda x: [x.transpose(2, 1, 0)])
_G = _Transform(lambda a: a[0].reshape(-1), lambda x: [x.reshape(1, 1, -1)])  # [1, 1, K] <-> [K]
POS = "encoder.pos_conv_embed.conv."
# transformers' weight_norm parametrisation (torch >= 2.1) and the older weight_g / weight_v.
POS_G, POS_V = POS + "parametrizations.weight.original0", POS + "parametrizations.weight.original1"
OLD_POS = {POS + "weight_g": POS_G, POS + "weight_v": POS_V}


def rules(config: AudioConfig) -> list[_Rule]:
  heads = config.num_heads
  layer = "encoder.layers.{i}."
  p = ("encoder", "layers")
  qkv = tuple(layer + f"attention.{n}_proj" for n in ("q", "k", "v"))
  layers = [
      _Rule(p + ("attention", "qkv_kernel"), tuple(k + ".weight" for k in qkv), _qkv_kernel(heads)),
      _Rule(p + ("attention", "qkv_bias"), tuple(k + ".bias" for k in qkv), _qkv_bias(heads)),
      _Rule(p + ("attention", "out_kernel"), (layer + "attention.out_proj.weight",),
            _out_kernel(heads)),
      _Rule(p + ("attention", "out_bias"), (layer + "attention.out_proj.bias",)),
      *_norm(p + ("norm_attn",), layer + "layer_norm"),
      *_linear(p + ("mlp", "wi"), layer + "feed_forward.intermediate_dense"),
      *_linear(p + ("mlp", "wo"), layer + "feed_forward.output_dense"),
      *_norm(p + ("norm_mlp",), layer + "final_layer_norm"),
  ]
  out = []
  for i in range(len(config.conv_dim)):
    conv = f"feature_extractor.conv_layers.{i}."
    out.append(_Rule((f"conv{i}_kernel",), (conv + "conv.weight",), _CONV1D))
    if config.conv_bias:
      out.append(_Rule((f"conv{i}_bias",), (conv + "conv.bias",)))
    if config.feat_extract_norm == "layer":
      out += _norm((f"conv{i}_norm",), conv + "layer_norm")
    elif i == 0:
      out += [_Rule(("conv0_norm_scale",), (conv + "layer_norm.weight",)),
              _Rule(("conv0_norm_bias",), (conv + "layer_norm.bias",))]
  return out + [
      *_norm(("projection_norm",), "feature_projection.layer_norm"),
      _Rule(("projection", "kernel"), ("feature_projection.projection.weight",), _LINEAR),
      _Rule(("projection", "bias"), ("feature_projection.projection.bias",)),
      _Rule(("masked_embed",), ("masked_spec_embed",)),
      _Rule(("pos_conv_g",), (POS_G,), _G),
      _Rule(("pos_conv_v",), (POS_V,), _CONV1D),
      _Rule(("pos_conv_bias",), (POS + "bias",)),
      *_norm(("norm",), "encoder.layer_norm"),
      *[_Rule(r.path, r.keys, r.transform, config.num_layers) for r in layers],
  ]


def config_from_transformers(hf: Mapping[str, Any]) -> AudioConfig:
  """Our AudioConfig of a Wav2Vec2Config dict; settings we do not build are errors naming them."""
  for name, ours in (("do_stable_layer_norm", False), ("hidden_act", "gelu"),
                     ("feat_extract_activation", "gelu"), ("add_adapter", False)):
    if hf.get(name, ours) != ours:
      raise ConversionError(f"config.{name}={hf.get(name)!r}: the audio encoder builds "
                            f"{name}={ours!r} (wav2vec2-base's layout) only")
  config = AudioConfig(
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
      layer_norm_eps=hf.get("layer_norm_eps", 1e-5), conv_dim=tuple(hf["conv_dim"]),
      conv_kernel=tuple(hf["conv_kernel"]), conv_stride=tuple(hf["conv_stride"]),
      conv_bias=bool(hf.get("conv_bias", False)),
      feat_extract_norm=hf.get("feat_extract_norm", "group"),
      num_conv_pos_embeddings=hf["num_conv_pos_embeddings"],
      num_conv_pos_embedding_groups=hf["num_conv_pos_embedding_groups"])
  try:
    config.validate("config")
  except ValueError as e:
    raise ConversionError(str(e)) from e
  return config


def config_to_transformers(config: AudioConfig):
  from transformers import Wav2Vec2Config  # pylint: disable=import-outside-toplevel
  return Wav2Vec2Config(
      hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
      layer_norm_eps=config.layer_norm_eps, conv_dim=list(config.conv_dim),
      conv_kernel=list(config.conv_kernel), conv_stride=list(config.conv_stride),
      conv_bias=config.conv_bias, feat_extract_norm=config.feat_extract_norm,
      num_conv_pos_embeddings=config.num_conv_pos_embeddings,
      num_conv_pos_embedding_groups=config.num_conv_pos_embedding_groups,
      do_stable_layer_norm=False, apply_spec_augment=True, architectures=["Wav2Vec2Model"])


def expected_shapes(config: AudioConfig) -> Any:
  """The tree of our parameter shapes (nothing computed)."""
  model = AudioEncoder(config, ComputeConfig())
  samples = max(sum(config.conv_kernel), 400)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.zeros((1, samples), np.float32))["params"])
  return nn.meta.unbox(shapes)


def from_transformers(src: Any) -> tuple[AudioConfig, dict]:
  """(config, params) of a Wav2Vec2Model: a save_pretrained directory or an instance. Weights
  under `wav2vec2.` (a Wav2Vec2For... head model) are read too; a head's own weights are named
  as unknown."""
  try:
    hf, state = transformers_io.load_source(src, ("wav2vec2",))
  except ValueError as e:
    raise ConversionError(f"{src if isinstance(src, str) else type(src).__name__}: {e}") from e
  state = {k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k: v for k, v in state.items()}
  state = {OLD_POS.get(k, k): v for k, v in state.items()}
  config = config_from_transformers(hf)
  table = rules(config)
  params, used = _gather(table, state, expected_shapes(config), "Wav2Vec2Model")
  unknown = sorted(k for k in state if k not in used)
  if unknown:
    raise ConversionError(f"Wav2Vec2Model: {len(unknown)} source weight(s) have no place in our "
                          "model: " + ", ".join(unknown[:20]))
  return config, params


def to_transformers(config: AudioConfig, params: Mapping, dst: str) -> str:
  """Writes dst (Wav2Vec2Model.from_pretrained(dst)); returns dst."""
  check_params(expected_shapes(config), params)
  transformers_io.write_directory(dst, config_to_transformers(config),
                                  _scatter(rules(config), params))
  return dst
