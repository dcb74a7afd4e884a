"""Converters between transformers' PyTorch FLAVA and flava_jax, both ways.

Public API (all importable from `flava_jax`):

    model, params = from_transformers("path/to/flava-full")      # FlavaForPreTraining or FlavaModel
    to_transformers(model, params, "out_dir")                     # FlavaForPreTraining.from_pretrained
    dvae, dvae_params = dvae_from_transformers("path/to/codebook")  # FlavaImageCodebook

Command line (writes/reads the Orbax checkpoints of flava_jax.checkpoint):

    python -m flava_jax.convert --from_transformers=DIR --out=CKPT_DIR
    python -m flava_jax.convert --to_transformers=CKPT_DIR --out=DIR
    python -m flava_jax.convert --to_transformers=WORKDIR --out=DIR   # its newest checkpoint

BLIP (flava_jax.convert_blip) goes through the same flags: --from_transformers takes one BLIP
directory (BlipForImageTextRetrieval or BlipForConditionalGeneration), RETRIEVAL_DIR,CAPTIONING_DIR
(one model of both), or a directory holding retrieval/ and captioning/; --to_transformers of a BLIP
model directory or workdir writes OUT/retrieval and OUT/captioning. Audio (flava_jax.convert_audio)
too: --from_transformers of a Wav2Vec2Model directory writes an audio model directory (task
"audio"), and --to_transformers of one, or of an audio_text workdir (its audio tower), writes a
Wav2Vec2Model directory.

An existing non-empty --out is refused unless --overwrite is given (and then only a folder that
holds a model is replaced, by one written beside it and swapped in once finished). Bad input is
one `error:` line and a non-zero exit.

Every weight is accounted for: a source weight we do not know, or a weight our model needs that the
source lacks, is an error that names them. Conversions are transposes and reshapes only, so a
round trip is bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flava_jax.models.config import (
    DVAEConfig, EncoderConfig, FlavaConfig, ImageConfig, MultimodalConfig, TextConfig)
from flava_jax.models.dvae import DVAE, init_dvae_params
from flava_jax.models.flava import FlavaModel, init_params
from flava_jax import transformers_io

Array = np.ndarray
PRETRAINING_PREFIX = "flava."
CODEBOOK_PREFIX = "image_codebook."
HEAD_NAMES = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head")
# Non-persistent buffers that some older checkpoints stored; they carry no learned values.
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


class ConversionError(ValueError):
  """A source checkpoint that cannot be converted exactly (unknown/missing/misshapen weights)."""


# ---------------------------------------------------------------------------------------------
# Weight transforms: (list of transformers arrays) <-> one of our arrays.


@dataclasses.dataclass(frozen=True)
class _Transform:
  to_ours: Callable[[Sequence[Array]], Array]
  to_hf: Callable[[Array], list[Array]]


_IDENTITY = _Transform(lambda a: a[0], lambda x: [x])
_LINEAR = _Transform(lambda a: a[0].T, lambda x: [x.T])  # torch [out, in] <-> ours [in, out]
_TOKEN = _Transform(lambda a: a[0].reshape(-1), lambda x: [x.reshape(1, 1, -1)])  # [1,1,D]
_POSITIONS = _Transform(lambda a: a[0][0], lambda x: [x[None]])  # [1, T, D] <-> [T, D]
# torch conv [out, in, kh, kw] <-> ours [kh, kw, in, out]
_CONV = _Transform(lambda a: a[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)])


def _qkv_kernel(heads: int) -> _Transform:
  def to_ours(a):  # 3 x [N*H, D] -> [D, 3, N, H]
    d = a[0].shape[1]
    return np.stack([w.T for w in a], axis=1).reshape(d, 3, heads, -1)

  def to_hf(x):
    d = x.shape[0]
    flat = x.reshape(d, 3, -1)
    return [np.array(flat[:, j].T, order="C") for j in range(3)]

  return _Transform(to_ours, to_hf)


def _qkv_bias(heads: int) -> _Transform:
  return _Transform(lambda a: np.stack(a).reshape(3, heads, -1),
                    lambda x: [x.reshape(3, -1)[j] for j in range(3)])


def _out_kernel(heads: int) -> _Transform:
  # torch [D, N*H] <-> ours [N, H, D]
  return _Transform(lambda a: a[0].T.reshape(heads, -1, a[0].shape[0]),
                    lambda x: [x.reshape(-1, x.shape[-1]).T])


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One leaf of our params <- the transformers key(s) it is made of.

  With `layers` set, keys contain "{i}" and our leaf stacks layers 0..layers-1 on axis 0.
  """

  path: tuple[str, ...]
  keys: tuple[str, ...]
  transform: _Transform = _IDENTITY
  layers: int | None = None

  def source_keys(self) -> list[str]:
    if self.layers is None:
      return list(self.keys)
    return [k.format(i=i) for i in range(self.layers) for k in self.keys]


def _linear(path: tuple[str, ...], key: str) -> list[_Rule]:
  return [_Rule(path + ("kernel",), (key + ".weight",), _LINEAR),
          _Rule(path + ("bias",), (key + ".bias",))]


def _norm(path: tuple[str, ...], key: str) -> list[_Rule]:
  return [_Rule(path + ("scale",), (key + ".weight",)), _Rule(path + ("bias",), (key + ".bias",))]


def _encoder_rules(path: tuple[str, ...], key: str, config: EncoderConfig) -> list[_Rule]:
  heads = config.num_heads
  layer = key + ".encoder.layer.{i}."
  p = path + ("encoder", "layers")
  attn = layer + "attention.attention."
  rules = [
      _Rule(p + ("attention", "qkv_kernel"),
            tuple(attn + n + ".weight" for n in ("query", "key", "value")), _qkv_kernel(heads)),
      _Rule(p + ("attention", "out_kernel"), (layer + "attention.output.dense.weight",),
            _out_kernel(heads)),
      _Rule(p + ("attention", "out_bias"), (layer + "attention.output.dense.bias",)),
      *_linear(p + ("mlp", "wi"), layer + "intermediate.dense"),
      *_linear(p + ("mlp", "wo"), layer + "output.dense"),
      *_norm(p + ("norm_attn",), layer + "layernorm_before"),
      *_norm(p + ("norm_mlp",), layer + "layernorm_after"),
  ]
  if config.qkv_bias:
    rules.append(_Rule(p + ("attention", "qkv_bias"),
                       tuple(attn + n + ".bias" for n in ("query", "key", "value")),
                       _qkv_bias(heads)))
  rules = [dataclasses.replace(r, layers=config.num_layers) for r in rules]
  rules += _norm(path + ("final_norm",), key + ".layernorm")
  rules += _linear(path + ("pooler", "dense"), key + ".pooler.dense")
  return rules


def flava_rules(config: FlavaConfig, prefix: str) -> list[_Rule]:
  """The complete mapping for a model with this config; prefix is "flava." or ""."""
  img, txt, mm = config.image, config.text, config.multimodal
  emb = prefix + "image_model.embeddings."
  temb = prefix + "text_model.embeddings."
  rules = [
      _Rule(("image_encoder", "embeddings", "patch_kernel"),
            (emb + "patch_embeddings.projection.weight",), _CONV),
      _Rule(("image_encoder", "embeddings", "patch_bias"),
            (emb + "patch_embeddings.projection.bias",)),
      _Rule(("image_encoder", "embeddings", "cls_token"), (emb + "cls_token",), _TOKEN),
      _Rule(("image_encoder", "embeddings", "mask_token"), (emb + "mask_token",), _TOKEN),
      _Rule(("image_encoder", "embeddings", "pos_embed"), (emb + "position_embeddings",),
            _POSITIONS),
      *_encoder_rules(("image_encoder",), prefix + "image_model", img),
      _Rule(("text_encoder", "embeddings", "word_embed"), (temb + "word_embeddings.weight",)),
      _Rule(("text_encoder", "embeddings", "position_embed"),
            (temb + "position_embeddings.weight",)),
      _Rule(("text_encoder", "embeddings", "token_type_embed"),
            (temb + "token_type_embeddings.weight",)),
      *_norm(("text_encoder", "embeddings", "norm"), temb + "LayerNorm"),
      *_encoder_rules(("text_encoder",), prefix + "text_model", txt),
      *_linear(("multimodal_encoder", "image_to_mm"), prefix + "image_to_mm_projection"),
      *_linear(("multimodal_encoder", "text_to_mm"), prefix + "text_to_mm_projection"),
      _Rule(("multimodal_encoder", "cls_token"), (prefix + "multimodal_model.cls_token",),
            _TOKEN),
      *_encoder_rules(("multimodal_encoder",), prefix + "multimodal_model", mm),
      *_linear(("image_projection",), prefix + "image_projection"),
      *_linear(("text_projection",), prefix + "text_projection"),
      _Rule(("logit_scale",), (prefix + "logit_scale",)),
  ]
  if config.pretraining_heads:
    for head in HEAD_NAMES:
      rules += _linear((head, "transform"), head + ".transform.dense")
      rules += _norm((head, "norm"), head + ".transform.LayerNorm")
      rules += _linear((head, "decoder"), head + ".decoder")
    rules += _linear(("itm_head", "pooler", "dense"), "itm_head.pooler.dense")
    rules += _linear(("itm_head", "classifier"), "itm_head.seq_relationship")
  return rules


def dvae_rules(config: DVAEConfig, prefix: str) -> list[_Rule]:
  """Encoder mapping (transformers' FlavaImageCodebook has no decoder)."""
  blocks = prefix + "blocks."
  rules = [_Rule(("encoder", "input", "kernel"), (blocks + "input.weight",), _CONV),
           _Rule(("encoder", "input", "bias"), (blocks + "input.bias",))]
  for g in range(1, config.num_groups + 1):
    for b in range(1, config.blocks_per_group + 1):
      ours = ("encoder", f"group_{g}_block_{b}")
      theirs = f"{blocks}group_{g}.group.block_{b}."
      if b == 1 and g > 1:  # the first block of groups 2-4 widens: 1x1 conv on the identity
        rules += [_Rule(ours + ("id_path", "kernel"), (theirs + "id_path.weight",), _CONV),
                  _Rule(ours + ("id_path", "bias"), (theirs + "id_path.bias",))]
      for c in range(1, 5):
        rules += [
            _Rule(ours + (f"res_conv_{c}", "kernel"),
                  (theirs + f"res_path.path.conv_{c}.weight",), _CONV),
            _Rule(ours + (f"res_conv_{c}", "bias"), (theirs + f"res_path.path.conv_{c}.bias",))]
  rules += [_Rule(("encoder", "output", "kernel"), (blocks + "output.conv.weight",), _CONV),
            _Rule(("encoder", "output", "bias"), (blocks + "output.conv.bias",))]
  return rules


# ---------------------------------------------------------------------------------------------
# Applying rules.


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path of keys: leaf} of a nested mapping."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _gather(rules: Sequence[_Rule], state: Mapping[str, Array], expected: Mapping,
            what: str) -> tuple[dict, set[str]]:
  """Builds our params from `state`; returns them and the set of source keys consumed."""
  missing = [k for r in rules for k in r.source_keys() if k not in state]
  if missing:
    raise ConversionError(
        f"{what}: {len(missing)} weight(s) our model needs are missing from the source: "
        + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
  params: dict = {}
  used: set[str] = set()
  expected_flat = flatten_tree(expected)
  for rule in rules:
    if rule.layers is None:
      value = rule.transform.to_ours([state[k] for k in rule.keys])
    else:
      value = np.stack([
          rule.transform.to_ours([state[k.format(i=i)] for k in rule.keys])
          for i in range(rule.layers)])
    used.update(rule.source_keys())
    shape = tuple(expected_flat[rule.path].shape)
    if tuple(value.shape) != shape:
      raise ConversionError(
          f"{what}: {'/'.join(rule.path)} from {rule.keys[0]} has shape {value.shape}, but the "
          f"model config implies {shape}")
    _set(params, rule.path, np.array(value, dtype=np.float32, order="C"))
  unfilled = sorted('/'.join(p) for p in set(expected_flat) - {r.path for r in rules})
  if unfilled:  # a gap in the mapping itself, never the user's fault
    raise AssertionError(f"{what}: no conversion rule for {unfilled}")
  return params, used


def _scatter(rules: Sequence[_Rule], params: Mapping) -> dict[str, Array]:
  flat = flatten_tree(params)
  state = {}
  for rule in rules:
    value = np.asarray(jax.device_get(flat[rule.path]), dtype=np.float32)
    if rule.layers is None:
      state.update(zip(rule.keys, rule.transform.to_hf(value)))
    else:
      for i in range(rule.layers):
        state.update(zip((k.format(i=i) for k in rule.keys), rule.transform.to_hf(value[i])))
  return state


def _check_unknown(state: Mapping[str, Array], used: set[str], ignored_prefixes: Sequence[str],
                   what: str) -> None:
  unknown = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES)
                   and not k.startswith(tuple(ignored_prefixes)))
  if unknown:
    raise ConversionError(
        f"{what}: {len(unknown)} source weight(s) have no place in our model: "
        + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))


# ---------------------------------------------------------------------------------------------
# Configs.


def _encoder_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ConversionError(f"{where}.hidden_act={act!r}: only exact GELU ('gelu') is supported")
  for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
    if hf.get(name, 0.0):
      logging.warning("%s.%s=%s is ignored: flava_jax models have no dropout", where, name,
                      hf[name])
  return dict(hidden_size=hf.get("hidden_size", 768), num_layers=hf.get("num_hidden_layers", 12),
              num_heads=hf.get("num_attention_heads", 12),
              mlp_dim=hf.get("intermediate_size", 3072),
              layer_norm_eps=hf.get("layer_norm_eps", 1e-12), qkv_bias=hf.get("qkv_bias", True))


def config_from_transformers(hf: Mapping[str, Any], pretraining_heads: bool) -> FlavaConfig:
  """Our FlavaConfig from a transformers FlavaConfig dict (missing fields take its defaults)."""
  image_hf = hf.get("image_config") or {}
  text_hf = hf.get("text_config") or {}
  mm_hf = hf.get("multimodal_config") or {}
  if not image_hf.get("mask_token", True):
    raise ConversionError("image_config.mask_token=False: flava_jax always has a [MASK] patch")
  if not mm_hf.get("use_cls_token", True):
    raise ConversionError("multimodal_config.use_cls_token=False is not supported")
  image = ImageConfig(**_encoder_fields(image_hf, "image_config"),
                      image_size=_scalar(image_hf.get("image_size", 224), "image_size"),
                      patch_size=_scalar(image_hf.get("patch_size", 16), "patch_size"),
                      num_channels=image_hf.get("num_channels", 3),
                      vocab_size=image_hf.get("vocab_size", 8192))
  text = TextConfig(**_encoder_fields(text_hf, "text_config"),
                    vocab_size=text_hf.get("vocab_size", 30522),
                    max_position_embeddings=text_hf.get("max_position_embeddings", 512),
                    type_vocab_size=text_hf.get("type_vocab_size", 2),
                    pad_token_id=text_hf.get("pad_token_id", 0) or 0)
  multimodal = MultimodalConfig(**_encoder_fields(mm_hf, "multimodal_config"))
  config = FlavaConfig(image=image, text=text, multimodal=multimodal,
                       projection_dim=hf.get("projection_dim", 768),
                       logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
                       pretraining_heads=pretraining_heads,
                       initializer_range=hf.get("initializer_range", 0.02)).validate()
  if pretraining_heads:
    sizes = {"hidden_size": hf.get("hidden_size", 768), "image_config.hidden_size":
             image.hidden_size, "text_config.hidden_size": text.hidden_size,
             "multimodal_config.hidden_size": multimodal.hidden_size}
    if len(set(sizes.values())) != 1:
      raise ConversionError(f"the pretraining heads need equal hidden sizes, got {sizes}")
  return config


def _scalar(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f"non-square image_config.{name}={value} is not supported")
    value = value[0]
  return int(value)


def config_to_transformers(config: FlavaConfig, dvae_config: DVAEConfig | None = None):
  """A transformers FlavaConfig equivalent to ours."""
  from transformers import FlavaConfig as HFFlavaConfig  # pylint: disable=import-outside-toplevel

  def encoder(c):
    return dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim, hidden_act="gelu",
                layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=config.initializer_range)

  img, txt = config.image, config.text
  kwargs = dict(
      image_config=dict(encoder(img), image_size=img.image_size, patch_size=img.patch_size,
                        num_channels=img.num_channels, mask_token=True, vocab_size=img.vocab_size),
      text_config=dict(encoder(txt), vocab_size=txt.vocab_size,
                       max_position_embeddings=txt.max_position_embeddings,
                       type_vocab_size=txt.type_vocab_size, pad_token_id=txt.pad_token_id),
      multimodal_config=dict(encoder(config.multimodal), use_cls_token=True),
      hidden_size=config.multimodal.hidden_size, projection_dim=config.projection_dim,
      logit_scale_init_value=config.logit_scale_init,
      initializer_range=config.initializer_range, init_codebook=dvae_config is not None)
  if dvae_config is not None:
    kwargs["image_codebook_config"] = dict(
        hidden_size=dvae_config.hidden_size, num_groups=dvae_config.num_groups,
        num_blocks_per_group=dvae_config.blocks_per_group, vocab_size=dvae_config.vocab_size,
        input_channels=dvae_config.input_channels)
  hf = HFFlavaConfig(**kwargs)
  hf.architectures = ["FlavaForPreTraining" if config.pretraining_heads else "FlavaModel"]
  return hf


def dvae_config_from_transformers(hf: Mapping[str, Any]) -> DVAEConfig:
  return DVAEConfig(hidden_size=hf.get("hidden_size", 256), num_groups=hf.get("num_groups", 4),
                    blocks_per_group=hf.get("num_blocks_per_group", 2),
                    vocab_size=hf.get("vocab_size", 8192),
                    input_channels=hf.get("input_channels", 3), decoder=False).validate()


# ---------------------------------------------------------------------------------------------
# Public API.


def _abstract(init_fn: Callable[[], Any]) -> Any:
  return jax.eval_shape(init_fn)


def _load(src: Any, model_types: tuple[str, ...]) -> tuple[dict, dict]:
  try:
    return transformers_io.load_source(src, model_types)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def _resolve_head_aliases(state: dict[str, Array]) -> None:
  """Older checkpoints store each head's decoder bias twice (`X.bias` tied to `X.decoder.bias`)."""
  for head in HEAD_NAMES:
    alias, key = f"{head}.bias", f"{head}.decoder.bias"
    if alias not in state:
      continue
    if key not in state:
      state[key] = state.pop(alias)
    elif np.array_equal(state[alias], state[key]):
      del state[alias]
    else:
      raise ConversionError(f"{alias} and {key} are tied in transformers but differ in the source")


def from_transformers(src: Any, dtype: str = "float32", **config_overrides: Any
                      ) -> tuple[FlavaModel, dict]:
  """(model, params) from a transformers FLAVA: a save_pretrained directory or a model object.

  FlavaForPreTraining sources give a model with all pretraining heads; FlavaModel sources give the
  backbone only (model.pretraining_heads=False). Weights of the image codebook inside a
  FlavaForPreTraining are left to `dvae_from_transformers`. `dtype` and `config_overrides` (e.g.
  attention_impl="cudnn", remat_policy="dots") change how the model computes, not its weights.
  """
  hf_config, state = _load(src, ("flava",))
  pretraining = any(k.startswith(PRETRAINING_PREFIX) for k in state)
  prefix = PRETRAINING_PREFIX if pretraining else ""
  if pretraining:
    _resolve_head_aliases(state)
  config = config_from_transformers(hf_config, pretraining_heads=pretraining)
  config = config.replace(dtype=dtype, **config_overrides)
  model = FlavaModel(config)
  expected = _abstract(lambda: init_params(model, jax.random.key(0)))
  params, used = _gather(flava_rules(config, prefix), state, expected, "from_transformers")
  _check_unknown(state, used, [CODEBOOK_PREFIX] if pretraining else [], "from_transformers")
  return model, jax.tree_util.tree_map(np.asarray, params)


def check_params(expected: Any, params: Mapping) -> None:
  """Parameters must have the leaves and shapes of `expected` (a tree of shapes): an error
  names the missing, unexpected or misshapen ones."""
  expected, given = flatten_tree(expected), flatten_tree(params)
  if set(expected) != set(given):
    raise ValueError(
        "params do not match the model: missing "
        f"{sorted('/'.join(p) for p in set(expected) - set(given))[:10]}, unexpected "
        f"{sorted('/'.join(p) for p in set(given) - set(expected))[:10]}")
  for path, shape in expected.items():
    if tuple(np.shape(given[path])) != tuple(shape.shape):
      raise ValueError(f"params do not match the model: {'/'.join(path)} has shape "
                       f"{tuple(np.shape(given[path]))}, the config implies {tuple(shape.shape)}")


def to_transformers(model: FlavaModel, params: Mapping, dst: str, dvae: DVAE | None = None,
                    dvae_params: Mapping | None = None) -> None:
  """Writes `dst` so that transformers' FlavaForPreTraining.from_pretrained(dst) loads our weights.

  A model without pretraining heads is written as a FlavaModel directory. With `dvae` and
  `dvae_params` the image codebook (its encoder) is written too and `init_codebook` is set.
  """
  config = model.config
  if (dvae is None) != (dvae_params is None):
    raise ValueError("pass both dvae and dvae_params, or neither")
  if dvae is not None and not config.pretraining_heads:
    raise ValueError("an image codebook can only be written with a FlavaForPreTraining model")
  prefix = PRETRAINING_PREFIX if config.pretraining_heads else ""
  check_params(_abstract(lambda: init_params(model, jax.random.key(0))), params)
  state = _scatter(flava_rules(config, prefix), params)
  if dvae is not None:
    enc_params = {"encoder": dvae_params["encoder"]}
    state.update(_scatter(dvae_rules(dvae.config, CODEBOOK_PREFIX), enc_params))
  hf_config = config_to_transformers(config, dvae.config if dvae is not None else None)
  transformers_io.write_directory(dst, hf_config, state)


def dvae_from_transformers(src: Any, dtype: str = "float32") -> tuple[DVAE, dict]:
  """(dvae, params) from a FlavaImageCodebook, or from the codebook inside a FlavaForPreTraining.

  The result has the encoder only (config.decoder=False): transformers ships no decoder.
  """
  hf_config, state = _load(src, ("flava", "flava_image_codebook"))
  if hf_config["model_type"] == "flava":
    if not any(k.startswith(CODEBOOK_PREFIX) for k in state):
      raise ConversionError("this FLAVA checkpoint holds no image codebook (init_codebook=False)")
    hf_codebook = hf_config.get("image_codebook_config") or {}
    prefix = CODEBOOK_PREFIX
    state = {k: v for k, v in state.items() if k.startswith(CODEBOOK_PREFIX)}
  else:
    hf_codebook, prefix = hf_config, ""
  config = dataclasses.replace(dvae_config_from_transformers(hf_codebook), dtype=dtype)
  model = DVAE(config)
  expected = _abstract(lambda: init_dvae_params(model, jax.random.key(0)))
  params, used = _gather(dvae_rules(config, prefix), state, expected, "dvae_from_transformers")
  _check_unknown(state, used, [], "dvae_from_transformers")
  return model, jax.tree_util.tree_map(np.asarray, params)


# ---------------------------------------------------------------------------------------------
# Command line.


class CommandError(ValueError):
  """A command line that cannot work; main prints it as one `error:` line."""


def _source_error(flag: str, src: str, e: Exception) -> CommandError:
  """`e` as one line naming the source (prefixed with the flag where it does not already)."""
  text = " ".join(str(e).split()) or type(e).__name__
  if src not in text and os.path.abspath(src) not in text:
    text = f"{flag}={src}: {text}"
  return CommandError(text)


def _holds_model(directory: str) -> bool:
  """A transformers directory (config.json), a flava_jax model directory, or a BLIP export
  (retrieval/ and/or captioning/ transformers directories)."""
  from flava_jax import checkpoint  # pylint: disable=import-outside-toplevel
  names = (transformers_io.CONFIG, checkpoint.MODEL_JSON,
           os.path.join("retrieval", transformers_io.CONFIG),
           os.path.join("captioning", transformers_io.CONFIG))
  return any(os.path.exists(os.path.join(directory, name)) for name in names)


def _check_out(out: str, overwrite: bool, sources: Sequence[str]) -> None:
  """Refuses an --out that is a file or a non-empty folder (without --overwrite), and never
  replaces a folder that holds something other than a model, or the source itself."""
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out):
    raise CommandError(f"--out={out} is a file, not a folder")
  entries = sorted(os.listdir(out))
  if not entries:
    return
  model = _holds_model(out)
  if not overwrite:
    what = "a model" if model else f"{len(entries)} files or folders (e.g. {entries[0]})"
    raise CommandError(f"--out={out} already holds {what}; pass --overwrite to replace it, or "
                       "choose a new --out")
  if not model:
    raise CommandError(
        f"--out={out} holds {len(entries)} files or folders (e.g. {entries[0]}) but no model "
        "(config.json or flava_jax_model.json); --overwrite only replaces a model "
        "folder: choose a new --out")
  real_out = os.path.realpath(out)
  for src in sources:
    real_src = os.path.realpath(src)
    if real_src == real_out or real_src.startswith(real_out + os.sep):
      raise CommandError(f"--out={out} holds the source {src}; choose another --out")


@contextlib.contextmanager
def _replacing(out: str) -> Iterator[str]:
  """A new empty folder beside `out` that becomes `out` when the block succeeds.

  An existing `out` is swapped for it only then (and deleted): a failed conversion leaves the
  old folder as it was, a finished one leaves no old file behind, and neither leaves a
  temporary folder.
  """
  out = os.path.realpath(out)  # a link to a folder: replace the folder, keep the link
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.converting-")
  try:
    if os.path.isdir(out):
      mode = stat.S_IMODE(os.stat(out).st_mode)
    else:
      umask = os.umask(0)
      os.umask(umask)
      mode = 0o777 & ~umask
    os.chmod(staging, mode)  # mkdtemp makes it private
    yield staging
    if os.path.lexists(out):
      old = staging + ".old"
      os.rename(out, old)
      try:
        os.rename(staging, out)
      except BaseException:
        os.rename(old, out)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)  # absent once swapped in


def load_workdir(workdir: str, field: str = "--to_transformers"
                 ) -> tuple[Any, Any, int, list[str]]:
  """(model, params, step, notes) of a FLAVA or BLIP training workdir's newest readable
  checkpoint.

  The model config is the workdir's run_config.json `model` (a BlipConfig's fields when its
  task is "blip"); a checkpoint that cannot be read is passed over for the one before it
  (noted). Errors name `field` and the workdir.
  """
  from flava_jax import warm_start  # pylint: disable=import-outside-toplevel
  run_config = os.path.join(workdir, warm_start.RUN_CONFIG)
  if not os.path.exists(run_config):
    raise FileNotFoundError(f"{field}={workdir}: the workdir has no {warm_start.RUN_CONFIG}")
  try:
    with open(run_config, encoding="utf-8") as f:
      run = json.load(f)
  except ValueError as e:
    raise ValueError(f"{run_config} is not JSON: {e}") from None
  model_config = run.get("model") if isinstance(run, dict) else None
  task = run.get("task", "flava") if isinstance(run, dict) else "flava"
  if task == "audio_text" and isinstance(run.get("audio"), dict):  # its audio tower
    from flava_jax.models import audio, config as configs  # pylint: disable=import-outside-toplevel
    config = audio.AudioConfig.from_dict(run["audio"], f"{field}={workdir}: audio")
    params, step, notes = warm_start.newest_readable_params(workdir, field)
    return audio.AudioEncoder(config, configs.ComputeConfig()), params["audio_encoder"], step, notes
  if task not in ("flava", "blip") or not isinstance(model_config, dict) or (
      "image" not in model_config):
    raise ValueError(f"{field}={workdir} is not a FLAVA training workdir nor a BLIP one (its "
                     f"{warm_start.RUN_CONFIG} describes task {task!r}"
                     + ("" if task not in ("flava", "blip") else
                        f" without a {task.upper()} model config") + ")")
  if task == "blip":
    from flava_jax.models.blip import Blip, BlipConfig  # pylint: disable=import-outside-toplevel
    model = Blip(BlipConfig.from_dict(model_config))
  else:
    model = FlavaModel(FlavaConfig.from_dict(model_config))
  params, step, notes = warm_start.newest_readable_params(workdir, field)
  return model, params, step, notes


def _is_audio(model: Any) -> bool:
  from flava_jax.models.audio import AudioEncoder  # pylint: disable=import-outside-toplevel
  return isinstance(model, AudioEncoder)


def run_command(from_hf: str = "", to_hf: str = "", out: str = "", overwrite: bool = False
                ) -> str:
  """The command line (--from_transformers=from_hf or --to_transformers=to_hf, --out,
  --overwrite); returns what to print, raises CommandError (one line)."""
  from flava_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from flava_jax import convert_blip  # pylint: disable=import-outside-toplevel
  from flava_jax import warm_start  # pylint: disable=import-outside-toplevel
  from flava_jax.model_summary import num_parameters  # pylint: disable=import-outside-toplevel

  if bool(from_hf) == bool(to_hf):
    raise CommandError("give exactly one of --from_transformers=DIR or --to_transformers=DIR")
  if not out:
    raise CommandError("--out is required")
  flag, src = ("--from_transformers", from_hf) if from_hf else ("--to_transformers", to_hf)
  blip_sources = None
  audio = from_hf and warm_start.model_type(src) == "wav2vec2"
  if from_hf and not audio:
    try:
      blip_sources = convert_blip.command_sources(src)
    except ValueError as e:
      raise _source_error(flag, src, e) from None
  _check_out(out, overwrite, list(blip_sources.values()) if blip_sources else [src])
  notes: list[str] = []
  try:
    if blip_sources:
      model, params = convert_blip.from_transformers(**blip_sources)
      dvae = dvae_params = None
    elif audio:
      from flava_jax import convert_audio  # pylint: disable=import-outside-toplevel
      from flava_jax.models.audio import AudioEncoder  # pylint: disable=import-outside-toplevel
      from flava_jax.models.config import ComputeConfig  # pylint: disable=import-outside-toplevel
      config, params = convert_audio.from_transformers(src)
      model, dvae, dvae_params = AudioEncoder(config, ComputeConfig()), None, None
    elif from_hf:
      model, params = from_transformers(src)
      dvae = dvae_params = None
      if model.config.pretraining_heads:
        try:
          dvae, dvae_params = dvae_from_transformers(src)
        except ConversionError as e:
          logging.info("no image codebook converted: %s", e)
    else:
      kind = warm_start.source_kind(src, flag)
      if kind == "transformers":
        raise ValueError(f"{flag}={src} is a transformers directory already; give a flava_jax "
                         "model directory (--from_transformers writes one) or a training workdir")
      if kind == "workdir":
        model, params, step, notes = load_workdir(src, flag)
        dvae = dvae_params = None
        notes.append(f"exported step {step}, the newest readable checkpoint of {src}"
                     + (" (without an image codebook: a workdir does not hold its frozen dVAE)"
                        if isinstance(model, FlavaModel) else ""))
      else:
        loaded = checkpoint.load_model(src)
        model, params, dvae, dvae_params = (loaded.model, loaded.params, loaded.dvae,
                                            loaded.dvae_params)
  except (ValueError, OSError) as e:
    raise _source_error(flag, src, e) from None
  try:
    with _replacing(out) as staging:
      if from_hf:
        checkpoint.save_model(staging, model.config, params, dvae.config if dvae else None,
                              dvae_params)
      elif isinstance(model, FlavaModel):
        to_transformers(model, params, staging, dvae, dvae_params)
      elif _is_audio(model):
        from flava_jax import convert_audio  # pylint: disable=import-outside-toplevel
        convert_audio.to_transformers(model.config, params, staging)
      else:
        convert_blip.to_transformers(model, params, staging)
  except OSError as e:
    raise CommandError(f"cannot write --out={out}: {e}") from None
  except ValueError as e:  # parameters that do not fit their config
    raise _source_error(flag, src, e) from None
  if blip_sources:
    done = (f"wrote {out}: BLIP with {num_parameters(params):,} parameters ("
            f"{convert_blip.describe(model.config)}) from "
            + " and ".join(f"{kind} {path}" for kind, path in blip_sources.items()))
  elif _is_audio(model):
    done = (f"wrote {out}: audio encoder with {num_parameters(params):,} parameters"
            if from_hf else f"wrote {out}: loadable with transformers' Wav2Vec2Model"
            ".from_pretrained")
  elif not isinstance(model, FlavaModel):
    done = f"wrote {out}: " + ", ".join(
        f"{os.path.join(out, kind)} loadable with transformers' {name}.from_pretrained"
        for kind, name in convert_blip.ARCHITECTURES.items()
        if getattr(model.config, "with_encoder" if kind == "retrieval" else "with_decoder"))
  elif from_hf:
    done = (f"wrote {out}: FLAVA with {num_parameters(params):,} parameters"
            + (", pretraining heads" if model.config.pretraining_heads else ", no heads")
            + (", dVAE encoder" if dvae else ""))
  else:
    done = (f"wrote {out}: loadable with transformers' "
            + ("FlavaForPreTraining" if model.config.pretraining_heads else "FlavaModel")
            + ".from_pretrained")
  return "\n".join(notes + [done])


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  try:
    if len(argv) > 1:
      raise CommandError(f"unexpected arguments {list(argv[1:])}")
    print(run_command(f.from_transformers or "", f.to_transformers or "", f.out or "",
                      f.overwrite))
  except CommandError as e:
    raise SystemExit(f"error: {e}") from None


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("from_transformers", None,
                      "a transformers save_pretrained directory (FlavaForPreTraining/FlavaModel, "
                      "or a BLIP: BlipForImageTextRetrieval or BlipForConditionalGeneration, "
                      "RETRIEVAL_DIR,CAPTIONING_DIR for one model of both, or a folder holding "
                      "retrieval/ and captioning/)")
  flags.DEFINE_string("to_transformers", None, "a flava_jax model directory (written by "
                      "--from_transformers) or a training workdir (its newest checkpoint)")
  flags.DEFINE_string("out", None, "output directory (new or empty, or see --overwrite)")
  flags.DEFINE_bool("overwrite", False, "replace an --out folder that holds a model; the new "
                    "one is written beside it first and swapped in when finished")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
