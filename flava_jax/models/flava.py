"""The FLAVA model: image, text and multimodal encoders, contrastive projections and heads.

Pure Flax linen: parameters live outside the module. Call any method through apply, e.g.

    model = FlavaModel(config)
    params = init_params(model, jax.random.key(0))
    hidden = model.apply({"params": params}, pixels, method="encode_image")   # [B, 1+P, D]

Images are NHWC floats (already normalised); text is int ids [B, L] with a {0,1} attention mask.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flava_jax import run_once
from flava_jax.models.config import FlavaConfig
from flava_jax.models.heads import ITMHead, MaskedPredictionHead, take_positions
from flava_jax.models.image import EncoderOutput, ImageEncoder
from flava_jax.models.multimodal import MultimodalEncoder
from flava_jax.models.text import TextEncoder
from flava_jax.models.transformer import Dense, dtype_of, param_with_axes

Array = jax.Array

LOGIT_SCALE_MAX = 4.6052  # ln(100): the reference clamps the learned scale to [0, ln 100].


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) in float32 (PyTorch's F.normalize)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


@flax.struct.dataclass
class FlavaOutput:
  """Everything a pretraining forward computes (None where an input or a head is absent).

  Logits are over whole sequences (mim/mmm_image over the P patch tokens, mlm/mmm_text over the L
  text tokens) unless the forward was given positions: then over those K positions per row
  ([B, K, vocab]). itm is from [CLS_M]. Losses pick positions with weights (flava_jax.losses).
  """

  image: EncoderOutput | None = None            # unmasked image
  text: EncoderOutput | None = None             # unmasked text
  image_masked: EncoderOutput | None = None     # image with [MASK] patches
  text_masked: EncoderOutput | None = None      # masked input ids
  multimodal_masked: EncoderOutput | None = None
  image_embedding: Array | None = None          # [B, projection_dim], L2-normalised
  text_embedding: Array | None = None
  logit_scale: Array | None = None
  mim_logits: Array | None = None               # [B, P, image vocab]
  mlm_logits: Array | None = None               # [B, L, text vocab]
  itm_logits: Array | None = None               # [B, 2]
  mmm_image_logits: Array | None = None         # [B, P, image vocab]
  mmm_text_logits: Array | None = None          # [B, L, text vocab]


class FlavaModel(nn.Module):
  config: FlavaConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    std = cfg.initializer_range
    self.image_encoder = ImageEncoder(cfg)
    self.text_encoder = TextEncoder(cfg)
    self.multimodal_encoder = MultimodalEncoder(cfg)
    self.image_projection = Dense(cfg.projection_dim, ("embed", "embed_out"), init_std=std,
                                  dtype=dtype, param_dtype=pdtype)
    self.text_projection = Dense(cfg.projection_dim, ("embed", "embed_out"), init_std=std,
                                 dtype=dtype, param_dtype=pdtype)
    self.logit_scale = self.param(
        "logit_scale", param_with_axes(nn.initializers.constant(cfg.logit_scale_init), ()), (),
        jnp.float32)
    if cfg.pretraining_heads:
      img, txt, mm = cfg.image, cfg.text, cfg.multimodal
      self.mim_head = MaskedPredictionHead(img.hidden_size, img.vocab_size, img.layer_norm_eps, cfg)
      self.mlm_head = MaskedPredictionHead(txt.hidden_size, txt.vocab_size, txt.layer_norm_eps, cfg)
      self.mmm_image_head = MaskedPredictionHead(mm.hidden_size, img.vocab_size,
                                                 img.layer_norm_eps, cfg)
      self.mmm_text_head = MaskedPredictionHead(mm.hidden_size, txt.vocab_size,
                                                txt.layer_norm_eps, cfg)
      self.itm_head = ITMHead(mm.hidden_size, cfg)

  # --- encoders -----------------------------------------------------------------------------

  def image_outputs(self, pixel_values: Array, bool_masked_pos: Array | None = None
                    ) -> EncoderOutput:
    """Image encoder on NHWC pixels; bool_masked_pos [B, P] (or [B, gh, gw]) marks [MASK] patches."""
    return self.image_encoder(pixel_values, bool_masked_pos)

  def text_outputs(self, input_ids: Array, attention_mask: Array | None = None,
                   token_type_ids: Array | None = None) -> EncoderOutput:
    return self.text_encoder(input_ids, attention_mask, token_type_ids)

  def multimodal_outputs(self, image_hidden: Array, text_hidden: Array,
                         attention_mask: Array | None = None) -> EncoderOutput:
    """Fusion of PRE-final-LayerNorm unimodal states (`EncoderOutput.hidden_state`)."""
    return self.multimodal_encoder(image_hidden, text_hidden, attention_mask)

  def encode_image(self, pixel_values: Array, bool_masked_pos: Array | None = None) -> Array:
    """[B, H, W, C] -> [B, 1+P, D], final LayerNorm applied."""
    return self.image_outputs(pixel_values, bool_masked_pos).last_hidden_state

  def encode_text(self, input_ids: Array, attention_mask: Array | None = None,
                  token_type_ids: Array | None = None) -> Array:
    """[B, L] ids -> [B, L, D], final LayerNorm applied."""
    return self.text_outputs(input_ids, attention_mask, token_type_ids).last_hidden_state

  def encode_multimodal(self, image_hidden: Array, text_hidden: Array,
                        attention_mask: Array | None = None) -> Array:
    """Pre-LN image [B, 1+P, D] and text [B, L, D] states -> [B, 2+P+L, D_mm]."""
    return self.multimodal_outputs(image_hidden, text_hidden, attention_mask).last_hidden_state

  # --- contrastive ---------------------------------------------------------------------------

  def project_image(self, image_last_hidden: Array) -> Array:
    """Final-LN image states [B, T, D] -> L2-normalised contrastive embedding of [CLS_I]."""
    return l2_normalize(self.image_projection(image_last_hidden[:, 0]))

  def project_text(self, text_last_hidden: Array) -> Array:
    return l2_normalize(self.text_projection(text_last_hidden[:, 0]))

  def image_embedding(self, pixel_values: Array) -> Array:
    """[B, H, W, C] -> [B, projection_dim], unit norm."""
    return self.project_image(self.encode_image(pixel_values))

  def text_embedding(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    """[B, L] -> [B, projection_dim], unit norm."""
    return self.project_text(self.encode_text(input_ids, attention_mask))

  def get_logit_scale(self) -> Array:
    return self.logit_scale

  # --- heads (any [..., D] input) ------------------------------------------------------------

  def _require_heads(self, name: str) -> None:
    if not self.config.pretraining_heads:
      raise ValueError(
          f"{name} needs the pretraining heads, but this model was built with "
          "model.pretraining_heads=False (e.g. converted from a transformers FlavaModel)")

  def mim_logits(self, image_tokens: Array) -> Array:
    self._require_heads("mim_logits")
    return self.mim_head(image_tokens)

  def mlm_logits(self, text_tokens: Array) -> Array:
    self._require_heads("mlm_logits")
    return self.mlm_head(text_tokens)

  def mmm_image_logits(self, multimodal_image_tokens: Array) -> Array:
    self._require_heads("mmm_image_logits")
    return self.mmm_image_head(multimodal_image_tokens)

  def mmm_text_logits(self, multimodal_text_tokens: Array) -> Array:
    self._require_heads("mmm_text_logits")
    return self.mmm_text_head(multimodal_text_tokens)

  def itm_logits(self, multimodal_last_hidden: Array) -> Array:
    """[B, T, D_mm] (final-LN multimodal states) -> [B, 2] from [CLS_M]."""
    self._require_heads("itm_logits")
    return self.itm_head(multimodal_last_hidden)

  # --- everything at once --------------------------------------------------------------------

  def __call__(self, pixel_values: Array | None = None, input_ids: Array | None = None,
               attention_mask: Array | None = None, bool_masked_pos: Array | None = None,
               input_ids_masked: Array | None = None, token_type_ids: Array | None = None,
               image_positions: Array | None = None, text_positions: Array | None = None
               ) -> FlavaOutput:
    """The reference pretraining forward: unmasked encodings for the contrastive embeddings,
    masked encodings (image [MASK] patches, masked ids) for MIM/MLM/MMM/ITM.

    Paired inputs give contrastive embeddings, ITM and MMM logits; image-only inputs give MIM
    logits; text-only inputs give MLM logits (as the reference routes them). image_positions
    [B, K] (patch indices in [0, P)) and text_positions [B, K'] (token indices) restrict the
    MIM/MMM-image and MLM/MMM-text heads to those positions, as the reference computes them only
    where labels are.
    """
    out: dict[str, Any] = {}
    heads = self.config.pretraining_heads
    image = text = image_masked = text_masked = None
    if pixel_values is not None:
      image = self.image_outputs(pixel_values)
      out["image_embedding"] = self.project_image(image.last_hidden_state)
      image_masked = (image if bool_masked_pos is None
                      else self.image_outputs(pixel_values, bool_masked_pos))
    if input_ids is not None:
      text = self.text_outputs(input_ids, attention_mask, token_type_ids)
      out["text_embedding"] = self.project_text(text.last_hidden_state)
      text_masked = (text if input_ids_masked is None
                     else self.text_outputs(input_ids_masked, attention_mask, token_type_ids))
    out.update(image=image, text=text, image_masked=image_masked, text_masked=text_masked,
               logit_scale=self.logit_scale)
    if image is not None and text is not None:
      mm = self.multimodal_outputs(image_masked.hidden_state, text_masked.hidden_state,
                                   attention_mask)
      out["multimodal_masked"] = mm
      if heads:
        num_image_tokens = image.hidden_state.shape[1]
        out["itm_logits"] = self.itm_head(mm.last_hidden_state)
        out["mmm_image_logits"] = self.mmm_image_head(take_positions(
            mm.last_hidden_state[:, 2:1 + num_image_tokens], image_positions))
        out["mmm_text_logits"] = self.mmm_text_head(take_positions(
            mm.last_hidden_state[:, 1 + num_image_tokens:], text_positions))
    elif heads and image is not None:
      out["mim_logits"] = self.mim_head(take_positions(image_masked.last_hidden_state[:, 1:],
                                                       image_positions))
    elif heads and text is not None:
      out["mlm_logits"] = self.mlm_head(take_positions(text_masked.last_hidden_state,
                                                       text_positions))
    return FlavaOutput(**out)

  def initialize(self, pixel_values: Array, input_ids: Array, attention_mask: Array) -> FlavaOutput:
    """Touches every submodule, so that init creates every parameter (used by init_params)."""
    out = self(pixel_values, input_ids, attention_mask)
    if self.config.pretraining_heads:
      self.mim_head(out.image.last_hidden_state)
      self.mlm_head(out.text.last_hidden_state)
    return out


def dummy_inputs(config: FlavaConfig, batch_size: int = 1, text_length: int = 8
                 ) -> dict[str, Array]:
  size, channels = config.image.image_size, config.image.num_channels
  return dict(
      pixel_values=jnp.zeros((batch_size, size, size, channels), jnp.float32),
      input_ids=jnp.zeros((batch_size, text_length), jnp.int32),
      attention_mask=jnp.ones((batch_size, text_length), jnp.int32))


def init_params(model: FlavaModel, rng: Array, boxed: bool = False) -> Any:
  """Random parameters. boxed=True keeps flax's logical-partitioning metadata on each leaf."""
  init = run_once.jit(functools.partial(model.init, method=FlavaModel.initialize))
  params = init(rng, **dummy_inputs(model.config))["params"]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(model: FlavaModel) -> Any:
  """Shapes/dtypes of the (boxed) parameters without allocating them."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True))


def logical_axes(model: FlavaModel) -> Any:
  """A pytree like params whose leaves are PartitionSpecs of logical axis names."""
  return nn.get_partition_spec(abstract_params(model))
