"""The tri-modal model of OPT (the Omni-Perception Pre-Trainer; `omni` here, so that no one takes
it for the OPT language models), on the shared layers.

    text   [B, L] ids     -> FLAVA's text encoder  -> [B, L, D_t]
    image  [B, S, S, 3]   -> FLAVA's ViT           -> [B, 1 + P, D_i]   (patches: the paper's
                                                      Faster R-CNN regions' stand-in)
    audio  [B, N] 16 kHz  -> the wav2vec 2.0-style encoder (models/audio.py) -> [B, F, D_a]
    cross-modal encoder: [CLS] + text + image + audio, each projected to D_x plus its modality-
        type embedding, through the FLAVA config's `multimodal` stack, final LayerNorm
        -> [B, 1 + L + 1 + P + F, D_x]; a key mask leaves out padding and whole masked modalities
    heads on the cross-modal outputs: MLM (text vocabulary), MVM regression (to the patch
        features) and classification (dVAE codes), MAM regression and contrastive projection (to
        the audio features), the 5-way match classifier on [CLS]
    decoders (causal, cross-attending to the cross-modal outputs): the text decoder (next
        WordPiece) and the image decoder (next dVAE code of the image's code grid, from a
        [BOS] code); the frozen dVAE's decoder turns codes into pixels (tasks/omni.py).

Every part has logical axes for sharding; the decoders support incremental decoding with a
key/value cache (`decode=True`, models/transformer.py) for models/decoding.py.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flava_jax.models.audio import AudioConfig, AudioEncoder
from flava_jax.models.config import ComputeConfig, EncoderConfig, FlavaConfig
from flava_jax.models.heads import MaskedPredictionHead
from flava_jax.models.image import ImageEncoder
from flava_jax.models.text import TextEncoder
from flava_jax.models.transformer import (
    ACT_EMBED, ACT_VOCAB, BATCH, LENGTH, Dense, Encoder, LayerNorm, Pooler, constrain, dtype_of,
    param_with_axes)

Array = jax.Array
MODALITIES = ("text", "image", "audio")  # the order of the cross-modal sequence and of masks
# The sample-level classes: which pairs of (text, image, audio) still belong together.
MATCH_CLASSES = ("all", "image_audio", "text_audio", "text_image", "none")


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Where each modality sits in the cross-modal sequence: [CLS] at 0, then text, image, audio."""

  text: int  # L tokens
  image: int  # 1 + P tokens ([CLS_I] and the patches)
  audio: int  # F frames

  @property
  def starts(self) -> dict[str, int]:
    return {"text": 1, "image": 1 + self.text, "audio": 1 + self.text + self.image}

  @property
  def total(self) -> int:
    return 1 + self.text + self.image + self.audio

  def part(self, hidden: Array, name: str) -> Array:
    start = self.starts[name]
    return hidden[:, start:start + getattr(self, name)]


class CrossModalEncoder(nn.Module):
  """[CLS] + the three projected sequences with modality-type embeddings -> the `multimodal`
  stack (pre-LN blocks) -> final LayerNorm."""

  model: FlavaConfig

  @nn.compact
  def __call__(self, text: Array, image: Array, audio: Array, mask: Array) -> Array:
    """text [B, L, D_t], image [B, 1+P, D_i], audio [B, F, D_a]; mask [B, 1+L+1+P+F] (True:
    a key every position may attend to)."""
    cfg = self.model.multimodal
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    std = self.model.initializer_range
    parts = []
    types = self.param("modality_embed", param_with_axes(nn.initializers.normal(std),
                                                         ("modality", "embed")),
                       (len(MODALITIES), cfg.hidden_size), pdtype)
    for i, (name, x) in enumerate(zip(MODALITIES, (text, image, audio))):
      projected = Dense(cfg.hidden_size, ("embed", "embed_out"), init_std=std, dtype=dtype,
                        param_dtype=pdtype, name=f"{name}_to_x")(x)
      parts.append(projected + types[i].astype(dtype))
    cls_token = self.param("cls_token", param_with_axes(nn.initializers.truncated_normal(std),
                                                        ("embed",)), (cfg.hidden_size,), pdtype)
    cls = jnp.broadcast_to(cls_token.astype(dtype), (text.shape[0], 1, cfg.hidden_size))
    x = constrain(jnp.concatenate([cls] + parts, axis=1), (BATCH, LENGTH, ACT_EMBED))
    hidden = Encoder(cfg, self.model.compute, name="encoder")(x, mask.astype(bool))
    return LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="final_norm")(hidden)


class CausalDecoder(nn.Module):
  """Token + position embeddings, LayerNorm, pre-LN causal blocks cross-attending to an encoder
  sequence, final LayerNorm, logits over the `vocab` (float32).

  start_token: id `vocab` reads a learned start embedding (the image decoder's [BOS] code,
  kept out of the table so that its rows still divide over the mesh)."""

  config: EncoderConfig
  compute: ComputeConfig
  vocab: int
  positions: int
  start_token: bool = False

  @nn.compact
  def __call__(self, ids: Array, mask: Array | None, encoder_hidden: Array | None,
               encoder_mask: Array | None, *, decode: bool = False,
               start: Array | int = 0) -> Array:
    """ids [B, T] at positions start .. start+T-1 -> logits [B, T, vocab]; encoder_hidden
    None in decode steps after the prefill (the cache holds its projections)."""
    cfg, compute = self.config, self.compute
    dtype, pdtype = dtype_of(compute.dtype), dtype_of(compute.param_dtype)
    length = ids.shape[1]
    if isinstance(start, int) and start + length > self.positions:
      raise ValueError(f"{start + length} decoder positions for a decoder of {self.positions}")
    init = nn.initializers.normal(compute.initializer_range)
    words = self.param("token_embed", param_with_axes(init, ("vocab", "embed")),
                       (self.vocab, cfg.hidden_size), pdtype)
    positions = self.param("position_embed", param_with_axes(init, ("position", "embed")),
                           (self.positions, cfg.hidden_size), pdtype)
    rows = jax.lax.dynamic_slice_in_dim(positions, jnp.asarray(start, jnp.int32), length, axis=0)
    x = jnp.take(words, jnp.clip(ids, 0, self.vocab - 1), axis=0)
    if self.start_token:
      start_embed = self.param("start_embed", param_with_axes(init, ("embed",)),
                               (cfg.hidden_size,), pdtype)
      x = jnp.where((ids == self.vocab)[..., None], start_embed, x)
    x = (x + rows[None]).astype(dtype)
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="norm")(x)
    x = constrain(x, (BATCH, LENGTH, ACT_EMBED))
    if encoder_hidden is not None and encoder_mask is None:
      encoder_mask = jnp.ones(encoder_hidden.shape[:2], bool)
    hidden = Encoder(cfg, compute, causal=True, cross_attention=True, norm_first=True,
                     name="decoder")(x, None if mask is None else mask.astype(bool),
                                     encoder_hidden, encoder_mask, decode=decode)
    hidden = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, name="final_norm")(hidden)
    logits = Dense(self.vocab, ("embed", "vocab"), init_std=compute.initializer_range,
                   dtype=dtype, param_dtype=pdtype, name="head")(hidden)
    return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, ACT_VOCAB))


class MatchHead(nn.Module):
  """The sample-level classifier: pooler (dense + tanh) on [CLS] (position 0 of [B, T, D]),
  then len(MATCH_CLASSES) logits (float32)."""

  hidden_size: int
  model: FlavaConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    dtype, pdtype = dtype_of(self.model.dtype), dtype_of(self.model.param_dtype)
    pooled = Pooler(self.hidden_size, self.model.compute, name="pooler")(hidden)
    logits = Dense(len(MATCH_CLASSES), ("embed", "classes"),
                   init_std=self.model.initializer_range, dtype=dtype, param_dtype=pdtype,
                   name="classifier")(pooled)
    return logits.astype(jnp.float32)


class OmniModel(nn.Module):
  """Every part of the tri-modal model; the task (tasks/omni.py) calls its methods."""

  config: FlavaConfig  # image, text, multimodal (the cross-modal stack), compute settings
  audio: AudioConfig
  text_decoder_config: EncoderConfig
  image_decoder_config: EncoderConfig
  code_vocab: int  # the dVAE's codebook
  code_length: int  # codes per image (the patch grid's)

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    std, width = cfg.initializer_range, cfg.multimodal.hidden_size
    eps = cfg.multimodal.layer_norm_eps
    self.text_encoder = TextEncoder(cfg)
    self.image_encoder = ImageEncoder(cfg)
    self.audio_encoder = AudioEncoder(self.audio, cfg.compute)
    self.cross_encoder = CrossModalEncoder(cfg)
    self.mlm_head = MaskedPredictionHead(width, cfg.text.vocab_size, eps, cfg)
    self.mvm_class_head = MaskedPredictionHead(width, self.code_vocab, eps, cfg)
    dense = lambda features: Dense(features, ("embed", "embed_out"), init_std=std, dtype=dtype,
                                   param_dtype=pdtype)
    self.mvm_regression = dense(cfg.image.hidden_size)
    self.mam_regression = dense(self.audio.conv_dim[-1])
    self.mam_contrastive = dense(self.audio.conv_dim[-1])
    self.match_head = MatchHead(width, cfg)
    self.text_decoder = CausalDecoder(self.text_decoder_config, cfg.compute, cfg.text.vocab_size,
                                      cfg.text.max_position_embeddings)
    self.image_decoder = CausalDecoder(self.image_decoder_config, cfg.compute, self.code_vocab,
                                       self.code_length, start_token=True)

  # --- encoders -----------------------------------------------------------------------------

  def encode_text(self, ids: Array, mask: Array) -> Array:
    return self.text_encoder(ids, mask).last_hidden_state

  def encode_image(self, pixels: Array, patch_mask: Array | None = None) -> Array:
    """Normalised NHWC pixels; patch_mask [B, P] True: the patch's pixels are zeroed (MVM:
    "features zeroed", the patch embedding is its bias alone)."""
    if patch_mask is not None:
      pixels = pixels * (1.0 - patch_pixels_mask(patch_mask, pixels.shape[1],
                                                 self.config.image.patch_size))
    return self.image_encoder(pixels).last_hidden_state

  def patch_features(self, pixels: Array) -> Array:
    """The image encoder's input feature of each patch [B, P, D_i]: the patch embedding (the
    stride-p projection and its bias, before [CLS] and positions), standardised over its
    features (mean 0, variance 1: the embedding itself grows as it trains, and a regression to
    it would chase that growth): MVM regression's target."""
    params = nn.meta.unbox(self.image_encoder.variables["params"]["embeddings"])
    kernel, bias = params["patch_kernel"], params["patch_bias"]
    p = self.config.image.patch_size
    batch, size = pixels.shape[0], pixels.shape[1]
    grid = size // p
    patches = pixels.reshape(batch, grid, p, grid, p, pixels.shape[-1])
    out = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(patches.dtype)) + bias
    out = out.reshape(batch, grid * grid, -1).astype(jnp.float32)
    centred = out - jnp.mean(out, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + 1e-6)

  def encode_audio(self, audio: Array, audio_mask: Array, mask_time: Array | None = None
                   ) -> dict[str, Array]:
    return self.audio_encoder(audio, audio_mask, mask_time)

  def fuse(self, text: Array, image: Array, audio: Array, mask: Array) -> Array:
    return self.cross_encoder(text, image, audio, mask)

  # --- heads --------------------------------------------------------------------------------

  def mlm_logits(self, hidden: Array) -> Array:
    return self.mlm_head(hidden)

  def mvm_outputs(self, hidden: Array) -> tuple[Array, Array]:
    """(regressed patch features [.., D_i] float32, code logits [.., V])."""
    return self.mvm_regression(hidden).astype(jnp.float32), self.mvm_class_head(hidden)

  def mam_outputs(self, hidden: Array) -> tuple[Array, Array]:
    """(regressed audio features, contrastive queries), both [.., C] float32."""
    return (self.mam_regression(hidden).astype(jnp.float32),
            self.mam_contrastive(hidden).astype(jnp.float32))

  def match_logits(self, hidden: Array) -> Array:
    """[B, 5] from the cross-modal outputs [B, T, D_x] (their [CLS])."""
    return self.match_head(hidden)

  def text_decoder_logits(self, ids: Array, mask: Array, encoder_hidden: Array | None,
                          encoder_mask: Array | None, *, decode: bool = False,
                          start: Array | int = 0) -> Array:
    return self.text_decoder(ids, mask, encoder_hidden, encoder_mask, decode=decode, start=start)

  def image_decoder_logits(self, codes: Array, encoder_hidden: Array | None,
                           encoder_mask: Array | None, *, decode: bool = False,
                           start: Array | int = 0) -> Array:
    return self.image_decoder(codes, None, encoder_hidden, encoder_mask, decode=decode,
                              start=start)

  def __call__(self, ids: Array, text_mask: Array, pixels: Array, audio: Array,
               audio_mask: Array) -> dict[str, Array]:
    """Every part once (parameter initialisation)."""
    text = self.encode_text(ids, text_mask)
    image = self.encode_image(pixels, jnp.zeros((pixels.shape[0], self.config.image.num_patches),
                                                bool))
    self.patch_features(pixels)
    sound = self.encode_audio(audio, audio_mask)
    mask = jnp.ones((ids.shape[0], 1 + text.shape[1] + image.shape[1]
                     + sound["hidden"].shape[1]), bool)
    hidden = self.fuse(text, image, sound["hidden"], mask)
    codes = jnp.zeros((ids.shape[0], self.code_length), jnp.int32)
    return {"mlm": self.mlm_logits(hidden), "mvm": self.mvm_outputs(hidden),
            "mam": self.mam_outputs(hidden), "match": self.match_logits(hidden),
            "text": self.text_decoder_logits(ids, text_mask, hidden, mask),
            "image": self.image_decoder_logits(codes, hidden, mask)}


def patch_pixels_mask(patch_mask: Array, size: int, patch: int) -> Array:
  """[B, P] patch mask -> [B, size, size, 1] float pixel mask (1: the pixel's patch is masked)."""
  grid = size // patch
  m = patch_mask.reshape(patch_mask.shape[0], grid, 1, grid, 1).astype(jnp.float32)
  m = jnp.broadcast_to(m, (patch_mask.shape[0], grid, patch, grid, patch))
  return m.reshape(patch_mask.shape[0], size, size, 1)
