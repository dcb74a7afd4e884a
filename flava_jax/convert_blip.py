"""Converters between transformers' BLIP and flava_jax's BLIP (models/blip.py), both ways.

transformers stores BLIP's MED as separate models; one flava_jax BLIP tree holds them together:

    BlipForImageTextRetrieval      vision_model, text_encoder, vision_proj, text_proj, itm_head
    BlipForConditionalGeneration   vision_model, text_decoder.bert, text_decoder.cls (LM head)

    model, params = from_transformers(retrieval="blip-itm-base-coco",
                                      captioning="blip-image-captioning-base")
    to_transformers(model, params, "out")   # out/retrieval and out/captioning (from_pretrained)

Either source may be omitted: the model then lacks the other's parts (BlipConfig.with_encoder /
with_decoder). Given both, their vision_model weights must be identical (one flava_jax model has
one ViT), else a ConversionError names the first differing weight.

Decisions (the transformers checkpoints cannot say them):
  * share_decoder. share_decoder=None (the default) shares the decoder's parameters with the
    encoder (the reference pretraining's layout) exactly when every decoder weight outside its
    self-attention sublayers equals the encoder's, and keeps a whole decoder otherwise (what the
    released fine-tuned checkpoints need: their encoder and decoder were trained apart). True
    demands sharing (a differing weight is an error naming it); False never shares. A model
    from one source never shares.
  * [ENC] (our text.enc_token_id) has no transformers field: it is bos_token_id + 1 (BLIP's
    tokenizer adds [DEC] then [ENC]), unless the text config carries an `enc_token_id`
    attribute, which to_transformers writes only for a model whose [ENC] is not bos + 1.
  * temp (the contrastive temperature) has no transformers weight: to_transformers writes it as
    the retrieval config's `flava_jax_temp` attribute (bit-exact through JSON), from_transformers
    reads it back, or starts from model.temp_init when absent (a released checkpoint).
  * The LM head's tied weights: transformers ties cls.predictions.decoder.weight to the word
    embeddings and decoder.bias to predictions.bias (when either tie_word_embeddings flag is
    set), and save_pretrained leaves the tied copies out; older checkpoints store them: they
    are accepted when equal to what they are tied to, and a difference is an error. An untied
    head keeps its own decoder.weight; its two biases must be equal (transformers' forward reads
    decoder.bias; flava_jax has one bias).
  * The text config's eos_token_id is written as sep_token_id ([SEP] ends a caption; BLIP's
    generate passes it as the EOS anyway).

Every weight is accounted for as in flava_jax.convert: unknown, missing and misshapen weights are
ConversionErrors naming them, and conversions are transposes and reshapes, so round trips are
bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flava_jax import transformers_io
from flava_jax.convert import (
    _CONV, _LINEAR, _POSITIONS, _TOKEN, ConversionError, _gather, _linear, _norm,
    _out_kernel, _qkv_bias, _qkv_kernel, _Rule, _scalar, _scatter, _Transform, check_params)
from flava_jax.models.blip import DECODER_OWN, Blip, BlipConfig, BlipTextConfig
from flava_jax.models.config import ImageConfig

Array = np.ndarray
RETRIEVAL, CAPTIONING = "retrieval", "captioning"
ARCHITECTURES = {RETRIEVAL: "BlipForImageTextRetrieval", CAPTIONING: "BlipForConditionalGeneration"}
TEMP_ATTRIBUTE = "flava_jax_temp"
ENC_ATTRIBUTE = "enc_token_id"
IGNORED_SUFFIXES = ("embeddings.position_ids",)  # a non-persistent buffer older files stored
LM = "text_decoder.cls.predictions."
DECODER_WORDS = "text_decoder.bert.embeddings.word_embeddings.weight"

# transformers' defaults for fields a config.json may leave out.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=384, patch_size=16,
                        layer_norm_eps=1e-5, hidden_act="gelu")
_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512,
                      layer_norm_eps=1e-12, hidden_act="gelu", bos_token_id=30522,
                      pad_token_id=0, sep_token_id=102, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# Rules: one leaf of our tree <- the transformers key(s) it is made of.


def _cross_q_kernel(heads: int) -> _Transform:
  # torch [N*H, D] <-> ours [D, N, H]
  return _Transform(lambda a: a[0].T.reshape(a[0].shape[1], heads, -1),
                    lambda x: [np.array(x.reshape(x.shape[0], -1).T, order="C")])


def _cross_kv_kernel(heads: int) -> _Transform:
  # key, value [N*H, D_enc] <-> ours [D_enc, 2, N, H]
  def to_ours(a):
    return np.stack([w.T for w in a], axis=1).reshape(a[0].shape[1], 2, heads, -1)

  def to_hf(x):
    flat = x.reshape(x.shape[0], 2, -1)
    return [np.array(flat[:, j].T, order="C") for j in range(2)]

  return _Transform(to_ours, to_hf)


def _heads_bias(heads: int, parts: int) -> _Transform:
  # `parts` x [N*H] <-> ours [parts, N, H] (parts=1: [N, H])
  if parts == 1:
    return _Transform(lambda a: a[0].reshape(heads, -1), lambda x: [x.reshape(-1)])
  return _Transform(lambda a: np.stack(a).reshape(parts, heads, -1),
                    lambda x: [x.reshape(parts, -1)[j] for j in range(parts)])


def vision_rules(config: BlipConfig) -> list[_Rule]:
  img, heads = config.image, config.image.num_heads
  emb, layer = "vision_model.embeddings.", "vision_model.encoder.layers.{i}."
  p = ("vision", "encoder", "layers")
  layers = [
      _Rule(p + ("attention", "qkv_kernel"), (layer + "self_attn.qkv.weight",),
            _Transform(lambda a: a[0].T.reshape(a[0].shape[1], 3, heads, -1),
                       lambda x: [np.array(x.reshape(x.shape[0], -1).T, order="C")])),
      _Rule(p + ("attention", "qkv_bias"), (layer + "self_attn.qkv.bias",),
            _Transform(lambda a: a[0].reshape(3, heads, -1), lambda x: [x.reshape(-1)])),
      _Rule(p + ("attention", "out_kernel"), (layer + "self_attn.projection.weight",),
            _out_kernel(heads)),
      _Rule(p + ("attention", "out_bias"), (layer + "self_attn.projection.bias",)),
      *_linear(p + ("mlp", "wi"), layer + "mlp.fc1"),
      *_linear(p + ("mlp", "wo"), layer + "mlp.fc2"),
      *_norm(p + ("norm_attn",), layer + "layer_norm1"),
      *_norm(p + ("norm_mlp",), layer + "layer_norm2"),
  ]
  return [
      _Rule(("vision", "embeddings", "patch_kernel"), (emb + "patch_embedding.weight",), _CONV),
      _Rule(("vision", "embeddings", "patch_bias"), (emb + "patch_embedding.bias",)),
      _Rule(("vision", "embeddings", "cls_token"), (emb + "class_embedding",), _TOKEN),
      _Rule(("vision", "embeddings", "pos_embed"), (emb + "position_embedding",), _POSITIONS),
      *[dataclasses.replace(r, layers=img.num_layers) for r in layers],
      *_norm(("vision", "final_norm"), "vision_model.post_layernorm"),
  ]


def _text_layer_rules(p: tuple[str, ...], layer: str, heads: int) -> list[_Rule]:
  """One BERT layer with cross-attention (keys contain {i}); rule paths under p."""
  attn, cross = layer + "attention.", layer + "crossattention."
  qkv = tuple(attn + f"self.{n}.weight" for n in ("query", "key", "value"))
  return [
      _Rule(p + ("attention", "qkv_kernel"), qkv, _qkv_kernel(heads)),
      _Rule(p + ("attention", "qkv_bias"),
            tuple(attn + f"self.{n}.bias" for n in ("query", "key", "value")), _qkv_bias(heads)),
      _Rule(p + ("attention", "out_kernel"), (attn + "output.dense.weight",), _out_kernel(heads)),
      _Rule(p + ("attention", "out_bias"), (attn + "output.dense.bias",)),
      *_norm(p + ("norm_attn",), attn + "output.LayerNorm"),
      _Rule(p + ("cross_attention", "q_kernel"), (cross + "self.query.weight",),
            _cross_q_kernel(heads)),
      _Rule(p + ("cross_attention", "q_bias"), (cross + "self.query.bias",), _heads_bias(heads, 1)),
      _Rule(p + ("cross_attention", "kv_kernel"),
            (cross + "self.key.weight", cross + "self.value.weight"), _cross_kv_kernel(heads)),
      _Rule(p + ("cross_attention", "kv_bias"),
            (cross + "self.key.bias", cross + "self.value.bias"), _heads_bias(heads, 2)),
      _Rule(p + ("cross_attention", "out_kernel"), (cross + "output.dense.weight",),
            _out_kernel(heads)),
      _Rule(p + ("cross_attention", "out_bias"), (cross + "output.dense.bias",)),
      *_norm(p + ("norm_cross",), cross + "output.LayerNorm"),
      *_linear(p + ("mlp", "wi"), layer + "intermediate.dense"),
      *_linear(p + ("mlp", "wo"), layer + "output.dense"),
      *_norm(p + ("norm_mlp",), layer + "output.LayerNorm"),
  ]


def text_rules(config: BlipConfig, part: str, key: str) -> list[_Rule]:
  """Our `part` (text_encoder / text_decoder) <- transformers' BlipTextModel at `key`."""
  txt = config.text
  emb = key + ".embeddings."
  layers = _text_layer_rules((part, "encoder", "layers"), key + ".encoder.layer.{i}.",
                             txt.num_heads)
  return [
      _Rule((part, "embeddings", "word_embed"), (emb + "word_embeddings.weight",)),
      _Rule((part, "embeddings", "position_embed"), (emb + "position_embeddings.weight",)),
      *_norm((part, "embeddings", "norm"), emb + "LayerNorm"),
      *[dataclasses.replace(r, layers=txt.num_layers) for r in layers],
  ]


def _is_own(rule: _Rule) -> bool:
  """A decoder rule for a parameter the decoder keeps when it shares the rest (DECODER_OWN)."""
  return rule.path[1:3] == ("encoder", "layers") and rule.path[3] in DECODER_OWN


def retrieval_rules(config: BlipConfig) -> list[_Rule]:
  return [*vision_rules(config), *text_rules(config, "text_encoder", "text_encoder"),
          *_linear(("vision_proj",), "vision_proj"), *_linear(("text_proj",), "text_proj"),
          *_linear(("itm_head",), "itm_head")]


def captioning_rules(config: BlipConfig, shared: bool = False) -> list[_Rule]:
  """The captioning model's rules; shared: the decoder's own parameters only (the rest are the
  encoder's, see `shared_decoder_pairs`)."""
  decoder = text_rules(config, "text_decoder", "text_decoder.bert")
  if shared:
    decoder = [r for r in decoder if _is_own(r)]
  rules = [*vision_rules(config), *decoder,
           *_linear(("lm_head", "transform"), LM + "transform.dense"),
           *_norm(("lm_head", "norm"), LM + "transform.LayerNorm"),
           _Rule(("lm_head", "bias"), (LM + "bias",))]
  if not config.tie_word_embeddings:
    rules.append(_Rule(("lm_head", "decoder", "kernel"), (LM + "decoder.weight",), _LINEAR))
  return rules


def shared_decoder_pairs(config: BlipConfig) -> list[tuple[str, str]]:
  """(decoder key, encoder key) of every decoder weight a shared decoder takes from the encoder."""
  encoder = {r.path[1:]: r for r in text_rules(config, "text_encoder", "text_encoder")}
  pairs = []
  for rule in text_rules(config, "text_decoder", "text_decoder.bert"):
    if not _is_own(rule):
      pairs += zip(rule.source_keys(), encoder[rule.path[1:]].source_keys())
  return pairs


# ---------------------------------------------------------------------------------------------
# Configs.


def _with_defaults(hf: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
  return {**defaults, **{k: v for k, v in (hf or {}).items() if v is not None}}


def _encoder(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  if hf["hidden_act"] != "gelu":
    raise ConversionError(f"{where}.hidden_act={hf['hidden_act']!r}: only exact GELU ('gelu') "
                          "is supported")
  for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
    if hf.get(name):
      logging.warning("%s.%s=%s is ignored: flava_jax models have no dropout", where, name,
                      hf[name])
  return dict(hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
              layer_norm_eps=hf["layer_norm_eps"], qkv_bias=True)


def config_from_transformers(hf: Mapping[str, Any], **fields: Any) -> BlipConfig:
  """Our BlipConfig from a transformers BlipConfig dict (missing fields take its defaults);
  `fields` set the rest (with_encoder, with_decoder, share_decoder, dtype, ...)."""
  vision = _with_defaults(hf.get("vision_config"), _VISION_DEFAULTS)
  text = _with_defaults(hf.get("text_config"), _TEXT_DEFAULTS)
  image = ImageConfig(**_encoder(vision, "vision_config"),
                      image_size=_scalar(vision["image_size"], "image_size"),
                      patch_size=_scalar(vision["patch_size"], "patch_size"))
  bos = text["bos_token_id"]
  text_config = BlipTextConfig(
      **_encoder(text, "text_config"), vocab_size=text["vocab_size"],
      max_position_embeddings=text["max_position_embeddings"], pad_token_id=text["pad_token_id"],
      bos_token_id=bos, enc_token_id=text.get(ENC_ATTRIBUTE, bos + 1),
      sep_token_id=text["sep_token_id"])
  tied = bool(hf.get("tie_word_embeddings", True) or text["tie_word_embeddings"])
  try:
    return BlipConfig(image=image, text=text_config,
                      embed_dim=hf.get("image_text_hidden_size", 256), tie_word_embeddings=tied,
                      initializer_range=hf.get("initializer_range", 0.02), **fields).validate()
  except ValueError as e:
    raise ConversionError(f"the transformers config does not make a valid BLIP: {e}") from None


def config_to_transformers(config: BlipConfig, architecture: str):
  """A transformers BlipConfig equivalent to ours (for `architecture`)."""
  from transformers import BlipConfig as HFBlipConfig  # pylint: disable=import-outside-toplevel
  img, txt = config.image, config.text
  for where, c in (("model.image", img), ("model.text", txt)):
    if not c.qkv_bias:
      raise ValueError(f"{where}.qkv_bias=False: transformers' BLIP always has q/k/v biases")
  if img.num_channels != 3:
    raise ValueError(f"model.image.num_channels={img.num_channels}: transformers' BLIP takes 3")

  def encoder(c):
    return dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim, hidden_act="gelu",
                layer_norm_eps=c.layer_norm_eps)

  text = dict(encoder(txt), vocab_size=txt.vocab_size,
              max_position_embeddings=txt.max_position_embeddings,
              pad_token_id=txt.pad_token_id, bos_token_id=txt.bos_token_id,
              sep_token_id=txt.sep_token_id, eos_token_id=txt.sep_token_id, is_decoder=True,
              tie_word_embeddings=config.tie_word_embeddings,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              initializer_range=config.initializer_range)
  hf = HFBlipConfig(
      vision_config=dict(encoder(img), image_size=img.image_size, patch_size=img.patch_size,
                         attention_dropout=0.0),
      text_config=text, image_text_hidden_size=config.embed_dim,
      tie_word_embeddings=config.tie_word_embeddings,
      initializer_range=config.initializer_range)
  if txt.enc_token_id != txt.bos_token_id + 1:
    setattr(hf.text_config, ENC_ATTRIBUTE, txt.enc_token_id)
  hf.architectures = [architecture]
  return hf


# ---------------------------------------------------------------------------------------------
# Reading sources.


def _kind(config: Mapping[str, Any], state: Mapping[str, Array]) -> str:
  """retrieval or captioning, from the weights (what the architectures field only claims)."""
  encoder = any(k.startswith("text_encoder.") for k in state)
  decoder = any(k.startswith("text_decoder.") for k in state)
  if encoder and decoder:
    raise ConversionError("a BLIP with both a text encoder and a decoder (BlipForQuestionAnswering"
                          f", architectures={config.get('architectures')}) is not supported; "
                          "convert a BlipForImageTextRetrieval and/or a "
                          "BlipForConditionalGeneration")
  if encoder:
    return RETRIEVAL
  if decoder:
    return CAPTIONING
  raise ConversionError(f"a BLIP without text weights (architectures="
                        f"{config.get('architectures')}) is neither a retrieval nor a captioning "
                        "model")


def _load(src: Any, expected: str) -> tuple[dict, dict]:
  try:
    config, state = transformers_io.load_source(src, ("blip",))
  except ValueError as e:
    raise ConversionError(f"{expected}={_name(src)}: {e}") from e
  kind = _kind(config, state)
  if kind != expected:
    raise ConversionError(f"{expected}={_name(src)} holds a {ARCHITECTURES[kind]} (its weights "
                          f"are {kind} weights); pass it as {kind}=")
  return config, state


def _name(src: Any) -> str:
  return os.fspath(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__


def _resolve_lm_head(state: dict[str, Array], tied: bool, what: str) -> set[str]:
  """Folds the LM head's tied duplicates into the keys our rules read; returns the keys it
  consumed. Tied: decoder.weight must equal the word embeddings; either way decoder.bias must
  equal predictions.bias (one bias in flava_jax)."""
  used = set()
  bias, decoder_bias, decoder_weight = LM + "bias", LM + "decoder.bias", LM + "decoder.weight"
  if decoder_bias in state:
    if bias not in state:
      state[bias] = state[decoder_bias]
    elif not np.array_equal(state[bias], state[decoder_bias]):
      raise ConversionError(f"{what}: {decoder_bias} differs from {bias}; flava_jax's LM head has "
                            "one bias (transformers ties them)")
    used.add(decoder_bias)
  if tied and decoder_weight in state:
    if DECODER_WORDS in state and not np.array_equal(state[decoder_weight], state[DECODER_WORDS]):
      raise ConversionError(f"{what}: {decoder_weight} differs from {DECODER_WORDS} although "
                            "tie_word_embeddings is set; they are one matrix in flava_jax")
    used.add(decoder_weight)
  return used


def _first_difference(pairs: Sequence[tuple[str, str]], a: Mapping[str, Array],
                      b: Mapping[str, Array], missing_differs: bool) -> str | None:
  """The first pair (key in a, key in b) whose arrays differ, as a message; a missing key
  counts as a difference when missing_differs (else the missing-weight check names it)."""
  for key_a, key_b in pairs:
    if key_a not in a or key_b not in b:
      if missing_differs:
        return f"{key_a if key_a not in a else key_b} (missing)"
      continue
    if a[key_a].shape != b[key_b].shape or not np.array_equal(a[key_a], b[key_b]):
      return key_a if key_a == key_b else f"{key_a} (vs {key_b})"
  return None


def _differing_field(a: Any, b: Any, prefix: str = "model") -> str | None:
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if dataclasses.is_dataclass(x):
      found = _differing_field(x, y, f"{prefix}.{field.name}")
      if found:
        return found
    elif x != y:
      return f"{prefix}.{field.name} ({x!r} vs {y!r})"
  return None


def from_transformers(retrieval: Any = None, captioning: Any = None, *,
                      share_decoder: bool | None = None, dtype: str = "float32",
                      **config_overrides: Any) -> tuple[Blip, dict]:
  """(model, params) from transformers' BlipForImageTextRetrieval and/or
  BlipForConditionalGeneration (save_pretrained directories or model objects).

  share_decoder: None shares the decoder with the encoder when both sources are given and the
  decoder's non-self-attention weights equal the encoder's; True requires that; False keeps a
  whole decoder (see the module docstring). dtype and config_overrides (attention_impl, ...)
  change how the model computes, not its weights.
  """
  if retrieval is None and captioning is None:
    raise ValueError("give retrieval=, captioning= or both")
  sources = {}
  if retrieval is not None:
    sources[RETRIEVAL] = _load(retrieval, RETRIEVAL)
  if captioning is not None:
    sources[CAPTIONING] = _load(captioning, CAPTIONING)
  what = "from_transformers(" + ", ".join(
      f"{kind}={_name(src)}" for kind, src in ((RETRIEVAL, retrieval), (CAPTIONING, captioning))
      if src is not None) + ")"

  configs = {kind: config_from_transformers(hf, with_encoder=kind == RETRIEVAL,
                                            with_decoder=kind == CAPTIONING, share_decoder=False)
             for kind, (hf, _) in sources.items()}
  config = configs.get(RETRIEVAL) or configs[CAPTIONING]
  states = {kind: state for kind, (_, state) in sources.items()}
  shared = False
  if len(sources) == 2:
    retrieval_config, captioning_config = configs[RETRIEVAL], configs[CAPTIONING]
    for section in ("image", "text"):
      differs = _differing_field(getattr(retrieval_config, section),
                                 getattr(captioning_config, section), f"model.{section}")
      if differs:
        raise ConversionError(f"{what}: the two configs differ in {differs}; one flava_jax BLIP "
                              "has one set of sizes: convert them one at a time")
    vision = [(k, k) for r in vision_rules(config) for k in r.source_keys()]
    differs = _first_difference(vision, states[RETRIEVAL], states[CAPTIONING], False)
    if differs:
      raise ConversionError(
          f"{what}: the two checkpoints' vision_model weights differ (first: {differs}); one "
          "flava_jax BLIP has one vision transformer: convert them one at a time "
          "(from_transformers(retrieval=...) and from_transformers(captioning=...))")
    config = dataclasses.replace(config, with_decoder=True,
                                 tie_word_embeddings=captioning_config.tie_word_embeddings)
    if share_decoder is not False:
      differs = _first_difference(shared_decoder_pairs(config), states[CAPTIONING],
                                  states[RETRIEVAL], True)
      if differs and share_decoder:
        raise ConversionError(
            f"{what}: share_decoder=True needs the decoder's weights outside its self-attention "
            f"to equal the text encoder's, but {differs} differs (pass share_decoder=None or "
            "False to keep a whole decoder)")
      shared = differs is None
  elif share_decoder:
    raise ConversionError(f"{what}: share_decoder=True needs both a retrieval and a captioning "
                          "source")
  config = dataclasses.replace(config, share_decoder=shared, dtype=dtype,
                               **config_overrides).validate()

  model = Blip(config)
  expected = jax.eval_shape(model.init_params, jax.random.key(0))
  params: dict = {}
  for kind, (hf, state) in sources.items():
    state = dict(state)
    where = f"from_transformers({kind}={_name(retrieval if kind == RETRIEVAL else captioning)})"
    used = set()
    if kind == RETRIEVAL:
      rules = retrieval_rules(config)
    else:
      used |= _resolve_lm_head(state, config.tie_word_embeddings, where)
      rules = captioning_rules(config, shared)
      if shared:
        used |= {k for k, _ in shared_decoder_pairs(config)}
      if RETRIEVAL in sources:  # the same vision weights (checked above): converted once
        rules = [r for r in rules if r.path[0] != "vision"]
        used |= {k for r in vision_rules(config) for k in r.source_keys() if k in state}
    part_expected = {k: v for k, v in expected.items()
                     if k in {r.path[0] for r in rules}}
    part, consumed = _gather(rules, state, part_expected, where)
    used |= consumed
    unknown = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if unknown:
      raise ConversionError(
          f"{where}: {len(unknown)} source weight(s) have no place in our model: "
          + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
    params.update(part)
    if kind == RETRIEVAL:
      params["temp"] = np.asarray(hf.get(TEMP_ATTRIBUTE, config.temp_init), np.float32)
  return model, params


def to_transformers(model: Blip | BlipConfig, params: Mapping, dst: str) -> list[str]:
  """Writes dst/retrieval (BlipForImageTextRetrieval.from_pretrained) when the model has the
  text encoder and dst/captioning (BlipForConditionalGeneration) when it has the decoder; returns
  the folders written. A shared decoder is written whole (transformers has no sharing)."""
  config = model.config if isinstance(model, Blip) else model
  blip = Blip(config)
  check_params(jax.eval_shape(blip.init_params, jax.random.key(0)), params)
  full = blip.expand(params)
  written = []
  if config.with_encoder:
    hf = config_to_transformers(config, ARCHITECTURES[RETRIEVAL])
    setattr(hf, TEMP_ATTRIBUTE, float(np.asarray(jax.device_get(params["temp"]), np.float32)))
    path = os.path.join(dst, RETRIEVAL)
    transformers_io.write_directory(path, hf, _scatter(retrieval_rules(config), full))
    written.append(path)
  if config.with_decoder:
    state = _scatter(captioning_rules(config), full)
    if not config.tie_word_embeddings:  # transformers' forward reads decoder.bias
      state[LM + "decoder.bias"] = state[LM + "bias"]
    path = os.path.join(dst, CAPTIONING)
    transformers_io.write_directory(path, config_to_transformers(config, ARCHITECTURES[CAPTIONING]),
                                    state)
    written.append(path)
  return written


# ---------------------------------------------------------------------------------------------
# The command line's sources (flava_jax.convert dispatches here).


def _is_blip_dir(directory: str) -> bool:
  path = os.path.join(directory, transformers_io.CONFIG)
  if not os.path.isfile(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("model_type") == "blip"
  except (OSError, ValueError, AttributeError):
    return False


def command_sources(argument: str) -> dict[str, str] | None:
  """The BLIP sources an --from_transformers argument names, or None when it is no BLIP:
    RETRIEVAL_DIR,CAPTIONING_DIR  (either side may be empty);
    DIR holding retrieval/ and/or captioning/ (what to_transformers writes);
    DIR holding one BLIP, told apart by its config's architectures.
  """
  if "," in argument:
    parts = argument.split(",")
    if len(parts) != 2 or not any(parts):
      raise ValueError(f"--from_transformers={argument}: give RETRIEVAL_DIR,CAPTIONING_DIR")
    return {kind: path for kind, path in zip((RETRIEVAL, CAPTIONING), parts) if path}
  inner = {kind: os.path.join(argument, kind) for kind in (RETRIEVAL, CAPTIONING)
           if _is_blip_dir(os.path.join(argument, kind))}
  if inner and not os.path.exists(os.path.join(argument, transformers_io.CONFIG)):
    return inner
  if not _is_blip_dir(argument):
    return None
  with open(os.path.join(argument, transformers_io.CONFIG), encoding="utf-8") as f:
    architectures = json.load(f).get("architectures") or []
  for kind, name in ARCHITECTURES.items():
    if name in architectures:
      return {kind: argument}
  raise ValueError(f"--from_transformers={argument}: a BLIP of architectures {architectures}; "
                   f"only {' and '.join(ARCHITECTURES.values())} convert (give "
                   "RETRIEVAL_DIR,CAPTIONING_DIR for both)")


def describe(config: BlipConfig) -> str:
  parts = []
  if config.with_encoder:
    parts.append("text encoder, ITC/ITM heads")
  if config.with_decoder:
    parts.append("shared decoder" if config.share_decoder else "decoder")
  return ", ".join(parts)
