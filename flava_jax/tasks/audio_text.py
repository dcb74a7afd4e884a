"""Audio-text contrastive pretraining: a wav2vec 2.0-style audio tower (models/audio.py) and a
text tower, the global contrastive loss between their projections. The audio modality's first
objective, on the seam: this file, configs/audio_text.py and evals/audio_retrieval.py.

    python -m flava_jax.main --config=configs/audio_text.py --workdir=/tmp/audio_text

Config sections: `audio` (models/audio.AudioConfig's fields), `model` (FlavaConfig: its text
section is the text tower, its compute fields, projection_dim and logit_scale_init are shared;
the image and multimodal sections are unused), and scalars `audio_samples` (the fixed audio
length of a batch row, 16 kHz samples) and `text_length`. Corpus kinds: audio and trimodal (a
trimodal example's image is not read); one step kind, "audio": audio, audio_mask, input_ids,
attention_mask.

The audio embedding is the mean of the encoder's output over the frames of real samples (wav2vec
2.0 has no [CLS]), projected and L2-normalised; the text embedding is h_CLS's projection.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import flops
from flava_jax.data import pipeline
from flava_jax.models.audio import AudioConfig, AudioEncoder
from flava_jax.models.config import FlavaConfig
from flava_jax.models.flava import l2_normalize
from flava_jax.models.text import TextEncoder
from flava_jax.models.transformer import Dense, dtype_of, param_with_axes
from flava_jax.tasks.base import Task
from flava_jax.tasks.clip import ContrastiveTowers
from flava_jax.tasks.flava import EncoderSizes

Array = jax.Array


def masked_mean(hidden: Array, mask: Array) -> Array:
  """[B, F, D] averaged over the frames where mask [B, F] is true (float32)."""
  weights = mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(
      jnp.sum(weights, axis=1), 1.0)


class AudioTextTowers(nn.Module):
  """Audio and text encoders with linear projections to a shared, L2-normalised space."""

  config: FlavaConfig
  audio: AudioConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.audio_encoder = AudioEncoder(self.audio, cfg.compute)
    self.text_encoder = TextEncoder(cfg)
    self.audio_projection = Dense(cfg.projection_dim, ("embed", "embed_out"),
                                  init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype)
    self.text_projection = Dense(cfg.projection_dim, ("embed", "embed_out"),
                                 init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype)
    self.logit_scale = self.param(
        "logit_scale", param_with_axes(nn.initializers.constant(cfg.logit_scale_init), ()), (),
        jnp.float32)

  def audio_tower(self, audio: Array, audio_mask: Array) -> tuple[Array, Array]:
    """(unit-norm embedding [B, P], pooled encoder output [B, D]) of 16 kHz waveforms."""
    out = self.audio_encoder(audio, audio_mask)
    pooled = masked_mean(out["hidden"], out["frame_mask"])
    return l2_normalize(self.audio_projection(pooled.astype(out["hidden"].dtype))), pooled

  def text_tower(self, ids: Array, mask: Array) -> tuple[Array, Array]:
    hidden = self.text_encoder(ids, mask).last_hidden_state
    return l2_normalize(self.text_projection(hidden[:, 0])), hidden[:, 0]

  def __call__(self, audio: Array, audio_mask: Array, ids: Array, mask: Array
               ) -> tuple[Array, Array, Array]:
    return (self.audio_tower(audio, audio_mask)[0], self.text_tower(ids, mask)[0],
            self.logit_scale)


class AudioTextTask(ContrastiveTowers, Task):
  """Audio-caption contrastive pretraining of two towers."""

  TOWERS = ("audio", "text")
  NAME = "audio_text"
  SECTIONS = ("model", "audio")
  SCALARS = {"audio_samples": int, "text_length": int}
  # init.audio_from: a Wav2Vec2Model directory (e.g. facebook/wav2vec2-base, converted on the fly)
  # or an audio task's workdir; init.text_from: a FLAVA or audio task's workdir or model.
  WARM_STARTS = {"model_from": None, "audio_from": ("audio_encoder",),
                 "text_from": ("text_encoder",)}

  def __init__(self, config: Mapping[str, Any]):
    self.model_config = FlavaConfig.from_dict(config["model"])
    self.audio_config = AudioConfig.from_dict(config["audio"], "audio")
    self.samples = int(config["audio_samples"])
    self.text_length = int(config["text_length"])
    if self.audio_config.frames(self.samples) < 1:
      raise ValueError(f"config.audio_samples={self.samples} is shorter than the audio "
                       "encoder's receptive field (no frame)")
    if self.text_length > self.model_config.text.max_position_embeddings:
      raise ValueError(f"config.text_length={self.text_length} exceeds "
                       "model.text.max_position_embeddings")
    self.model = AudioTextTowers(self.model_config, self.audio_config)

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("audio", "trimodal")

  def step_kind(self, corpus_kind: str) -> str:
    return "audio"

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    text = self.model_config.text
    shapes = pipeline.Shapes(image_size=1, patch_size=1, dvae_size=1,
                             paired_text_length=self.text_length, text_length=self.text_length,
                             text_vocab_size=text.vocab_size, text_pad_id=text.pad_token_id)
    tok = pipeline.load_tokenizer(data_cfg, shapes)
    return {k: pipeline.audio_text_processor(data_cfg, k, self.samples, tok, self.text_length,
                                             train) for k in sorted(set(kinds))}

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"audio": jax.ShapeDtypeStruct((rows, self.samples), jnp.float32),
            "audio_mask": jax.ShapeDtypeStruct((rows, self.samples), jnp.int32),
            "input_ids": jax.ShapeDtypeStruct((rows, self.text_length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((rows, self.text_length), jnp.int32)}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, spec = np.random.default_rng(seed), self.batch_spec(kind, rows)
    vocab = self.model_config.text.vocab_size
    lengths = rng.integers(self.samples // 2, self.samples + 1, rows)
    mask = (np.arange(self.samples)[None] < lengths[:, None]).astype(np.int32)
    return {"audio": (rng.normal(0, 0.1, spec["audio"].shape) * mask).astype(np.float32),
            "audio_mask": mask,
            "input_ids": rng.integers(5, vocab, spec["input_ids"].shape).astype(np.int32),
            "attention_mask": np.ones(spec["attention_mask"].shape, np.int32)}

  def _init(self, rng: Array) -> Any:
    return self.model.init(rng, jnp.zeros((1, self.samples), jnp.float32),
                           jnp.ones((1, self.samples), jnp.int32),
                           jnp.zeros((1, self.text_length), jnp.int32),
                           jnp.ones((1, self.text_length), jnp.int32))["params"]

  def _embed(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    audio, text, _ = self.model.apply({"params": params}, batch["audio"], batch["audio_mask"],
                                      batch["input_ids"], batch["attention_mask"])
    return {"audio": audio, "text": text, "rows": jnp.ones(audio.shape[:1], jnp.float32)}

  def audio_encoder_flops(self) -> float:
    """Forward FLOPs of one row's audio encoder (convolutions, projection, transformer)."""
    return flops.audio_encoder_flops(self.audio_config, self.samples)

  def step_flops(self, kind: str, global_batch: int) -> float:
    cfg = self.model_config
    per_example = 3 * (self.audio_encoder_flops() + flops.text_encoder_flops(
        cfg, self.text_length) + 2 * (self.audio_config.hidden_size + cfg.text.hidden_size)
                       * cfg.projection_dim)
    return global_batch * per_example + 3 * 2 * 2 * global_batch**2 * cfg.projection_dim

  def describe(self, params: Any) -> str:
    seconds = self.samples / self.audio_config.sample_rate
    return (f"audio-text towers ({self.audio_config.frames(self.samples)} audio frames of "
            f"{seconds:.2f} s)")

  def predict(self) -> "AudioTextPredictor":
    return AudioTextPredictor(self.model, self.samples, self.text_length,
                              functools.partial(self.logical_axes))


@dataclasses.dataclass(frozen=True)
class AudioTextPredictor(EncoderSizes):
  """Audio and text embeddings for the audio retrieval evaluator."""

  model: AudioTextTowers
  audio_samples: int
  text_length: int
  logical_axes: Any  # () -> the parameters' logical axes

  def audio_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    embedding, pooled = self.model.apply({"params": params}, batch["audio"],
                                         batch["audio_mask"], method="audio_tower")
    return {"embedding": embedding, "cls": pooled}

  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    embedding, cls = self.model.apply({"params": params}, batch["input_ids"],
                                      batch["attention_mask"], method="text_tower")
    return {"embedding": embedding, "cls": cls.astype(jnp.float32)}
