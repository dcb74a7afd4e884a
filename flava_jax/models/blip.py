"""BLIP's multimodal mixture of encoder-decoder (MED) on the shared layers.

    model = Blip(BlipConfig(...))
    params = model.init_params(jax.random.key(0))
    image = model.image_embeds(params, pixels)                     # [B, 1+P, D_v], final LN
    text = model.text_hidden(params, ids, mask)                    # unimodal: [CLS] at 0
    fused = model.text_hidden(params, enc_ids, mask, image)        # image-grounded: [ENC] at 0
    logits = model.decoder_logits(params, dec_ids, mask, image)    # causal: [DEC] at 0

Parts (top-level parameter groups):
  vision        ViT: patch embedding, [CLS], positions, pre-LN blocks, final LayerNorm (no
                [MASK] patch, no pooler)
  text_encoder  BERT without token types: word + position embeddings and LayerNorm, then post-LN
                blocks of self-attention -> cross-attention (to the image tokens, only when an
                image is given) -> MLP; no final LayerNorm, no pooler
  text_decoder  the same blocks with causal self-attention. share_decoder=True (the reference
                pretraining): only its self-attention sublayers (`attention`, `norm_attn` of every
                layer) are its own, everything else is the encoder's; share_decoder=False (how
                transformers stores captioning checkpoints): a whole text model of its own
  vision_proj, text_proj   [CLS] -> embed_dim (256), L2-normalised by the callers
  itm_head      [ENC] output -> 2 logits
  lm_head       dense -> GELU -> LayerNorm -> vocabulary logits, the output matrix tied to the
                decoder's word embeddings (tie_word_embeddings) plus a bias
  temp          the contrastive temperature (a divisor), learnable

BlipConfig.with_encoder / with_decoder say which parts exist (both by default): a model
converted from transformers' BlipForImageTextRetrieval alone has no text_decoder/lm_head, one
from BlipForConditionalGeneration alone no text_encoder/vision_proj/text_proj/itm_head/temp.

With share_decoder, `expand(params)` fills the decoder's shared parts in from the encoder before
every apply, so gradients of the decoder's loss reach the shared encoder parameters.

Text inputs follow BLIP's mode tokens: the unimodal encoder reads [CLS] at position 0, the
image-grounded encoder [ENC] (`with_first_token`), the decoder [DEC] as its BOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax import run_once
from flava_jax.models.config import ComputeConfig, EncoderConfig, ImageConfig, compute_of
from flava_jax.models.image import ImageEmbeddings
from flava_jax.models.transformer import (
    ACT_EMBED, ACT_VOCAB, BATCH, LENGTH, Dense, Encoder, LayerNorm, constrain, dtype_of,
    param_with_axes)
from flava_jax.parse import dataclass_from_dict

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) in float32 (PyTorch's F.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), eps)


@dataclasses.dataclass(frozen=True)
class BlipTextConfig(EncoderConfig):
  """BERT-base with BLIP's two extra tokens: vocab 30524 = bert-base-uncased's 30522 + [DEC]
  (the decoder's BOS, 30522) + [ENC] (30523). Captions end with [SEP] (the decoder's EOS)."""

  num_heads: int = 12
  vocab_size: int = 30524
  max_position_embeddings: int = 512
  pad_token_id: int = 0
  bos_token_id: int = 30522  # [DEC]
  enc_token_id: int = 30523  # [ENC]
  sep_token_id: int = 102    # [SEP]: the end of a caption

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    for name in ("pad_token_id", "bos_token_id", "enc_token_id", "sep_token_id"):
      value = getattr(self, name)
      if not 0 <= value < self.vocab_size:
        raise ValueError(f"{prefix}.{name}={value} is outside the vocabulary of "
                         f"{prefix}.vocab_size={self.vocab_size}")


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """The whole MED. `image.vocab_size` is unused (BLIP has no masked-image objective)."""

  image: ImageConfig = ImageConfig(layer_norm_eps=1e-6)
  text: BlipTextConfig = BlipTextConfig()
  embed_dim: int = 256
  share_decoder: bool = True
  # Which parts exist (a model converted from one transformers checkpoint lacks the other's):
  # with_encoder: text_encoder, vision_proj, text_proj, itm_head, temp (ITC, ITM);
  # with_decoder: text_decoder, lm_head (LM). The vision transformer is always there.
  with_encoder: bool = True
  with_decoder: bool = True
  tie_word_embeddings: bool = True
  temp_init: float = 0.07
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_unroll: int = 1

  @property
  def compute(self) -> ComputeConfig:
    return compute_of(self)

  def validate(self) -> "BlipConfig":
    self.image.validate("model.image")
    self.text.validate("model.text")
    self.compute.validate("model")
    if self.embed_dim <= 0:
      raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
    if not 0.0 < self.temp_init:
      raise ValueError(f"model.temp_init must be positive, got {self.temp_init}")
    if not (self.with_encoder or self.with_decoder):
      raise ValueError("model.with_encoder and model.with_decoder are both False: a BLIP model "
                       "needs its text encoder, its decoder or both")
    if self.share_decoder and not (self.with_encoder and self.with_decoder):
      raise ValueError("model.share_decoder=True needs both the text encoder and the decoder "
                       "(model.with_encoder and model.with_decoder)")
    if self.attention_impl == "splash":
      raise ValueError("model.attention_impl='splash' is bidirectional self-attention only; "
                       "BLIP's text blocks cross-attend and decode (use xla, cudnn or auto)")
    return self

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "BlipConfig":
    return dataclass_from_dict(cls, values, "model").validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _layers(cfg: BlipConfig) -> tuple[Any, Any]:
  return dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)


class VisionTransformer(nn.Module):
  """ViT: embeddings, pre-LN blocks, final LayerNorm over every token -> [B, 1+P, D_v]."""

  config: BlipConfig

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    dtype, pdtype = _layers(cfg)
    x = ImageEmbeddings(cfg, mask_token=False, name="embeddings")(pixel_values, None)
    x = Encoder(cfg.image, cfg.compute, name="encoder")(x, None)
    return LayerNorm(cfg.image.layer_norm_eps, dtype, pdtype, name="final_norm")(x)


class TextEmbeddings(nn.Module):
  """word + absolute position embeddings, then LayerNorm (BERT without token types)."""

  config: BlipConfig

  @nn.compact
  def __call__(self, input_ids: Array, start: Array | int = 0) -> Array:
    """input_ids [B, T] at positions start .. start + T - 1."""
    cfg = self.config.text
    dtype, pdtype = _layers(self.config)
    length = input_ids.shape[1]
    if isinstance(start, int) and start + length > cfg.max_position_embeddings:
      raise ValueError(f"text length {start + length} exceeds model.text.max_position_embeddings"
                       f"={cfg.max_position_embeddings}")
    init = nn.initializers.normal(self.config.initializer_range)
    words = self.param("word_embed", param_with_axes(init, ("vocab", "embed")),
                       (cfg.vocab_size, cfg.hidden_size), pdtype)
    positions = self.param("position_embed", param_with_axes(init, ("position", "embed")),
                           (cfg.max_position_embeddings, cfg.hidden_size), pdtype)
    position_rows = jax.lax.dynamic_slice_in_dim(positions, jnp.asarray(start, jnp.int32),
                                                 length, axis=0)
    x = jnp.take(words, input_ids, axis=0) + position_rows[None]
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm")(x)
    return constrain(x, (BATCH, LENGTH, ACT_EMBED))


class TextTransformer(nn.Module):
  """BLIP's BERT: embeddings and post-LN blocks with cross-attention to the image tokens.

  causal=False: the encoder (bidirectional); True: the decoder. cross_attention=False applies
  the same parameters without the cross-attention sublayers (the unimodal text mode reads the
  same parameter tree and ignores them)."""

  config: BlipConfig
  causal: bool = False
  cross_attention: bool = True

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None,
               image: Array | None = None, image_mask: Array | None = None, *,
               decode: bool = False, start: Array | int = 0) -> Array:
    """hidden [B, T, D] after the last block (BERT has no final LayerNorm)."""
    cfg = self.config
    x = TextEmbeddings(cfg, name="embeddings")(input_ids, start)
    mask = None if attention_mask is None else attention_mask.astype(bool)
    if image is not None and image_mask is None and not decode:
      image_mask = jnp.ones(image.shape[:2], bool)
    return Encoder(cfg.text, cfg.compute, causal=self.causal, cross_attention=self.cross_attention,
                   norm_first=False, name="encoder")(x, mask, image, image_mask, decode=decode)


class LMHead(nn.Module):
  """BERT's prediction head: dense -> GELU -> LayerNorm -> logits over the vocabulary.

  tied: the output matrix is the word-embedding table (given), plus this head's own bias."""

  config: BlipConfig

  @nn.compact
  def __call__(self, hidden: Array, word_embed: Array | None) -> Array:
    cfg = self.config
    dtype, pdtype = _layers(cfg)
    h = Dense(cfg.text.hidden_size, ("embed", "embed_out"), init_std=cfg.initializer_range,
              dtype=dtype, param_dtype=pdtype, name="transform")(hidden)
    h = jax.nn.gelu(h, approximate=False)
    h = LayerNorm(cfg.text.layer_norm_eps, dtype, pdtype, name="norm")(h)
    if cfg.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", h, word_embed.astype(dtype))
    else:
      logits = Dense(cfg.text.vocab_size, ("embed", "vocab"), use_bias=False,
                     init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype,
                     name="decoder")(h)
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("vocab",)),
                      (cfg.text.vocab_size,), pdtype)
    logits = logits + bias.astype(dtype)
    return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, ACT_VOCAB))


class MED(nn.Module):
  """Every part, for init and for apply; call through `Blip`, which shares the decoder's
  parameters with the encoder."""

  config: BlipConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = _layers(cfg)
    std = cfg.initializer_range
    self.vision = VisionTransformer(cfg)
    self.text_encoder = TextTransformer(cfg, causal=False)
    self.text_decoder = TextTransformer(cfg, causal=True)
    self.vision_proj = Dense(cfg.embed_dim, ("embed", "embed_out"), init_std=std, dtype=dtype,
                             param_dtype=pdtype)
    self.text_proj = Dense(cfg.embed_dim, ("embed", "embed_out"), init_std=std, dtype=dtype,
                           param_dtype=pdtype)
    self.itm_head = Dense(2, ("embed", "classes"), init_std=std, dtype=dtype, param_dtype=pdtype)
    self.lm_head = LMHead(cfg)
    if cfg.with_encoder:
      self.temp = self.param("temp", param_with_axes(nn.initializers.constant(cfg.temp_init), ()),
                             (), jnp.float32)

  def __call__(self, pixels: Array, ids: Array, mask: Array) -> tuple[Array | None, ...]:
    """Touches every parameter of the parts the config has (init)."""
    cfg = self.config
    image = self.vision(pixels)
    outputs = [None] * 5
    if cfg.with_encoder:
      text = self.text_encoder(ids, mask, image)
      outputs[:3] = (self.vision_proj(image[:, 0]), self.text_proj(text[:, 0]),
                     self.itm_head(text[:, 0]))
      outputs[4] = self.temp
    if cfg.with_decoder:
      hidden = self.text_decoder(ids, mask, image)
      outputs[3] = self.lm_head(hidden, self._word_embed("text_decoder"))
    return tuple(outputs)

  def _word_embed(self, part: str) -> Array | None:
    if not self.config.tie_word_embeddings:
      return None
    return nn.meta.unbox(self.variables["params"][part]["embeddings"]["word_embed"])

  def image_embeds(self, pixels: Array) -> Array:
    return self.vision(pixels)

  def image_feature(self, image: Array) -> Array:
    """[B, 1+P, D_v] -> L2-normalised [B, embed_dim] of [CLS]."""
    return l2_normalize(self.vision_proj(image[:, 0]))

  def text_hidden(self, ids: Array, mask: Array, image: Array | None = None,
                  image_mask: Array | None = None) -> Array:
    if image is None:  # unimodal: the same parameters without the cross-attention sublayers
      return TextTransformer(self.config, causal=False, cross_attention=False,
                             parent=None).apply(
                                 {"params": nn.meta.unbox(self.variables["params"]["text_encoder"])},
                                 ids, mask)
    return self.text_encoder(ids, mask, image, image_mask)

  def text_feature(self, hidden: Array) -> Array:
    return l2_normalize(self.text_proj(hidden[:, 0]))

  def itm_logits(self, hidden: Array) -> Array:
    return self.itm_head(hidden[:, 0]).astype(jnp.float32)

  def decoder_logits(self, ids: Array, mask: Array, image: Array,
                     image_mask: Array | None = None) -> Array:
    hidden = self.text_decoder(ids, mask, image, image_mask)
    return self.lm_head(hidden, self._word_embed("text_decoder"))

  def decode_step(self, ids: Array, mask: Array | None, image: Array | None,
                  image_mask: Array | None, start: Array) -> Array:
    """Incremental decoding (the "cache" collection): logits [B, T_step, V]."""
    hidden = self.text_decoder(ids, mask, image, image_mask, decode=True, start=start)
    return self.lm_head(hidden, self._word_embed("text_decoder"))


# The decoder's own parameters when it shares the rest with the encoder: every layer's
# self-attention sublayer and its LayerNorm.
DECODER_OWN = ("attention", "norm_attn")
# The parts the momentum encoders copy (BLIP's ITC): the text encoder without its cross-attention.
MOMENTUM_PARTS = ("vision", "vision_proj", "text_encoder", "text_proj")
CROSS_ATTENTION = ("cross_attention", "norm_cross")
# The config flag each Blip method's part needs (see BlipConfig.with_encoder / with_decoder).
_METHOD_PARTS = {"image_feature": "with_encoder", "text_hidden": "with_encoder",
                 "text_feature": "with_encoder", "itm_logits": "with_encoder",
                 "decoder_logits": "with_decoder", "decode_step": "with_decoder"}


def unimodal_text(text_encoder: Mapping[str, Any]) -> dict[str, Any]:
  """The text encoder's parameters without the cross-attention sublayers (what the unimodal
  mode reads; the momentum text encoder keeps only these)."""
  layers = {k: v for k, v in text_encoder["encoder"]["layers"].items()
            if k not in CROSS_ATTENTION}
  return dict(text_encoder, encoder=dict(text_encoder["encoder"], layers=layers))


@dataclasses.dataclass(frozen=True)
class Blip:
  """The MED with BLIP's parameter sharing; every method takes the parameter tree as stored."""

  config: BlipConfig

  @property
  def module(self) -> MED:
    return MED(self.config)

  # --- parameters ---------------------------------------------------------------------------

  def _init_boxed(self, rng: Array) -> Any:
    cfg = self.config
    size, length = cfg.image.image_size, 4
    variables = self.module.init(rng, jnp.zeros((1, size, size, cfg.image.num_channels)),
                                 jnp.zeros((1, length), jnp.int32),
                                 jnp.ones((1, length), jnp.int32))
    return self.prune(variables["params"])

  def init_params(self, rng: Array) -> Any:
    return nn.meta.unbox(run_once.jit(self._init_boxed)(rng))

  def abstract_params(self) -> Any:
    """The stored parameters' ShapeDtypeStructs, boxed with their logical axes."""
    return jax.eval_shape(self._init_boxed, jax.random.key(0))

  def logical_axes(self) -> Any:
    return nn.get_partition_spec(self.abstract_params())

  def prune(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """A full parameter tree -> the stored one (with share_decoder: the decoder keeps only its
    self-attention sublayers)."""
    params = dict(params)
    if self.config.share_decoder:
      layers = params["text_decoder"]["encoder"]["layers"]
      params["text_decoder"] = {"encoder": {"layers": {k: layers[k] for k in DECODER_OWN}}}
    return params

  def expand(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """The stored tree -> the full one every apply reads (shared decoder parts filled in)."""
    if not self.config.share_decoder:
      return dict(params)
    encoder = params["text_encoder"]
    own = params["text_decoder"]["encoder"]["layers"]
    layers = dict(encoder["encoder"]["layers"], **own)
    decoder = dict(encoder, encoder=dict(encoder["encoder"], layers=layers))
    return dict(params, text_decoder=decoder)

  def _apply(self, params: Any, *args, method: str, **kwargs) -> Any:
    part = _METHOD_PARTS.get(method)
    if part is not None and not getattr(self.config, part):
      raise ValueError(f"{method} needs the part this model lacks (model.{part}=False, e.g. a "
                       "model converted from only one transformers checkpoint)")
    return self.module.apply({"params": self.expand(params)}, *args, method=method, **kwargs)

  # --- the three modes ----------------------------------------------------------------------

  def image_embeds(self, params: Any, pixels: Array) -> Array:
    """Normalised NHWC pixels -> [B, 1+P, D_v] (after the final LayerNorm)."""
    return self._apply(params, pixels, method="image_embeds")

  def image_feature(self, params: Any, image: Array) -> Array:
    return self._apply(params, image, method="image_feature")

  def text_hidden(self, params: Any, ids: Array, mask: Array, image: Array | None = None,
                  image_mask: Array | None = None) -> Array:
    """The text encoder: unimodal without `image`, image-grounded with it. [B, T, D]."""
    return self._apply(params, ids, mask, image, image_mask, method="text_hidden")

  def text_feature(self, params: Any, hidden: Array) -> Array:
    return self._apply(params, hidden, method="text_feature")

  def itm_logits(self, params: Any, hidden: Array) -> Array:
    return self._apply(params, hidden, method="itm_logits")

  def decoder_logits(self, params: Any, ids: Array, mask: Array, image: Array,
                     image_mask: Array | None = None) -> Array:
    """Causal LM logits [B, T, V] (float32): position t predicts token t + 1."""
    return self._apply(params, ids, mask, image, image_mask, method="decoder_logits")

  # --- incremental decoding -----------------------------------------------------------------

  def init_cache(self, params: Any, batch: int, max_length: int, image_tokens: int) -> Any:
    """A zeroed key/value cache for `batch` rows of up to max_length tokens."""
    cfg = self.config
    ids = jnp.zeros((batch, max_length), jnp.int32)
    image = jnp.zeros((batch, image_tokens, cfg.image.hidden_size), dtype_of(cfg.dtype))

    def create(params):
      _, variables = self.module.apply({"params": self.expand(params)}, ids, None, image, None,
                                       jnp.zeros((), jnp.int32), method="decode_step",
                                       mutable=["cache"])
      return variables["cache"]

    shapes = jax.eval_shape(create, params)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode_step(self, params: Any, cache: Any, ids: Array, mask: Array | None,
                  image: Array | None, image_mask: Array | None, start: Array
                  ) -> tuple[Array, Any]:
    """Feeds ids [B, T_step] at positions start.. (image: the prefill only) -> (logits [B,
    T_step, V], the updated cache)."""
    logits, variables = self.module.apply(
        {"params": self.expand(params), "cache": cache}, ids, mask, image, image_mask, start,
        method="decode_step", mutable=["cache"])
    return logits, variables["cache"]


def with_first_token(ids: Array, token: int) -> Array:
  """ids with position 0 replaced (BLIP's mode tokens: [ENC] for ITM, [DEC] for the decoder)."""
  return ids.at[:, 0].set(token)
