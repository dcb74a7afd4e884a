"""A CLIP-style two-tower contrastive task: an image tower, a text tower, the global contrastive
loss over their projections. Built only from the shared layers (models/) and losses.

It exists to prove the Task seam: this file, configs/clip.py and its tests are all it took (the
trainer, pipeline, bench, AOT tool and evaluators were not edited for it).

    python -m flava_jax.main --config=configs/clip.py --workdir=/tmp/clip

Config sections: `model` (the towers' sizes and compute settings: FlavaConfig's image and text
sections, projection_dim, logit_scale_init; its multimodal section is unused) and
`paired_text_length`. One batch kind, paired: pixels, input_ids, attention_mask.
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

from flava_jax import flops, run_once
from flava_jax.data import pipeline, transforms
from flava_jax.losses import contrastive
from flava_jax.models.config import FlavaConfig
from flava_jax.models.flava import LOGIT_SCALE_MAX, l2_normalize
from flava_jax.models.image import ImageEncoder
from flava_jax.models.text import TextEncoder
from flava_jax.models.transformer import Dense, dtype_of, param_with_axes
from flava_jax.tasks.base import GradCacheSplit, LossOutput, StepContext, Task, from_boxed
from flava_jax.tasks.flava import EncoderSizes, decays  # FLAVA's encoders

Array = jax.Array


class TwoTower(nn.Module):
  """Image and text encoders with linear projections to a shared, L2-normalised space."""

  config: FlavaConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.image_encoder = ImageEncoder(cfg)
    self.text_encoder = TextEncoder(cfg)
    self.image_projection = Dense(cfg.projection_dim, ("embed", "embed_out"),
                                  init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype)
    self.text_projection = Dense(cfg.projection_dim, ("embed", "embed_out"),
                                 init_std=cfg.initializer_range, dtype=dtype, param_dtype=pdtype)
    self.logit_scale = self.param(
        "logit_scale", param_with_axes(nn.initializers.constant(cfg.logit_scale_init), ()), (),
        jnp.float32)

  def image_tower(self, pixels: Array) -> tuple[Array, Array]:
    """(unit-norm embedding [B, P], final-LN h_CLS [B, D]) of normalised NHWC pixels."""
    hidden = self.image_encoder(pixels).last_hidden_state
    return l2_normalize(self.image_projection(hidden[:, 0])), hidden[:, 0]

  def text_tower(self, ids: Array, mask: Array) -> tuple[Array, Array]:
    hidden = self.text_encoder(ids, mask).last_hidden_state
    return l2_normalize(self.text_projection(hidden[:, 0])), hidden[:, 0]

  def __call__(self, pixels: Array, ids: Array, mask: Array) -> tuple[Array, Array, Array]:
    return self.image_tower(pixels)[0], self.text_tower(ids, mask)[0], self.logit_scale


class ContrastiveTowers:
  """The step of a two-tower contrastive task: the global contrastive loss between the towers'
  unit-norm embeddings (`_embed` returns {TOWERS[0]: [B, P], TOWERS[1]: [B, P],
  "rows": [B]}), the learned temperature clamped after each update, the GradCache split, and
  the parameters (`_init`: boxed with their logical axes; FLAVA's weight-decay rule). Mixed
  into a Task (ClipTask; the audio-text task)."""

  TOWERS = ("image", "text")

  def _init(self, rng: Array) -> Any:
    """The towers' parameters (boxed with their logical axes) from dummy inputs."""
    raise NotImplementedError

  def _embed(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    raise NotImplementedError

  def init_params(self, rng: Array) -> Any:
    return nn.meta.unbox(run_once.jit(self._init)(rng))

  def logical_axes(self) -> Any:
    return self.abstract_params()[1]

  def abstract_params(self) -> tuple[Any, Any]:
    return from_boxed(jax.eval_shape(self._init, jax.random.key(0)))

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path)

  def _contrast(self, params: Any, embeddings: Mapping[str, Array], ctx: StepContext
                ) -> tuple[Array, dict[str, Array]]:
    first, second = self.TOWERS
    loss = contrastive.global_contrastive_loss(
        embeddings[first], embeddings[second], params["logit_scale"].astype(jnp.float32),
        embeddings["rows"], mesh=ctx.mesh)
    return loss, {"contrastive": loss, "logit_scale": params["logit_scale"]}

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    loss, metrics = self._contrast(params, self._embed(params, batch), ctx)
    return LossOutput(loss, metrics)

  def after_update(self, params: Any, extra: Any, extra_update: Any) -> tuple[Any, Any]:
    return dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX)), extra

  def gradcache(self, kind: str) -> GradCacheSplit:
    embed = lambda params, frozen, batch, rng, ctx: (self._embed(params, batch), {}, {})
    return GradCacheSplit(embed=embed, contrast=self._contrast,
                          weights={"global_contrastive": 1.0})


class ClipTask(ContrastiveTowers, Task):
  """Image-text contrastive pretraining of two towers."""

  NAME = "clip"
  SECTIONS = ("model",)
  SCALARS = {"paired_text_length": int}

  def __init__(self, config: Mapping[str, Any]):
    self.model_config = FlavaConfig.from_dict(config["model"])
    self.text_length = config["paired_text_length"]
    if self.text_length > self.model_config.text.max_position_embeddings:
      raise ValueError(f"config.paired_text_length={self.text_length} exceeds "
                       "model.text.max_position_embeddings")
    self.model = TwoTower(self.model_config)

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("paired",)

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    image, text = self.model_config.image, self.model_config.text
    shapes = pipeline.Shapes(
        image_size=image.image_size, patch_size=image.patch_size, dvae_size=image.patch_size,
        paired_text_length=self.text_length, text_length=self.text_length,
        text_vocab_size=text.vocab_size, text_pad_id=text.pad_token_id)
    return pipeline.flava_processors(data_cfg, kinds, shapes, train)

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.model_config.image.image_size
    return {"pixels": jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8),
            "input_ids": jax.ShapeDtypeStruct((rows, self.text_length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((rows, self.text_length), jnp.int32)}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, spec = np.random.default_rng(seed), self.batch_spec(kind, rows)
    vocab = self.model_config.text.vocab_size
    return {"pixels": rng.integers(0, 256, spec["pixels"].shape, dtype=np.uint8),
            "input_ids": rng.integers(5, vocab, spec["input_ids"].shape).astype(np.int32),
            "attention_mask": np.ones(spec["attention_mask"].shape, np.int32)}

  def _init(self, rng: Array) -> Any:
    size, length = self.model_config.image.image_size, self.text_length
    return self.model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32),
                           jnp.zeros((1, length), jnp.int32),
                           jnp.ones((1, length), jnp.int32))["params"]

  def _embed(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    pixels = transforms.encoder_pixels(batch["pixels"])
    image, text, _ = self.model.apply({"params": params}, pixels, batch["input_ids"],
                                      batch["attention_mask"])
    return {"image": image, "text": text, "rows": jnp.ones(image.shape[:1], jnp.float32)}

  def step_flops(self, kind: str, global_batch: int) -> float:
    cfg = self.model_config
    per_example = 3 * (flops.image_encoder_flops(cfg) + flops.text_encoder_flops(
        cfg, self.text_length) + 2 * (cfg.image.hidden_size + cfg.text.hidden_size)
                       * cfg.projection_dim)
    return global_batch * per_example + 3 * 2 * 2 * global_batch**2 * cfg.projection_dim

  def describe(self, params: Any) -> str:
    return "CLIP-style two towers"

  def predict(self) -> "ClipPredictor":
    return ClipPredictor(self.model, self.text_length, functools.partial(self.logical_axes))


@dataclasses.dataclass(frozen=True)
class ClipPredictor(EncoderSizes):
  """Image and text embeddings for the retrieval and zero-shot evaluators."""

  model: TwoTower
  text_length: int
  logical_axes: Any  # () -> the parameters' logical axes

  def image_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    embedding, cls = self.model.apply({"params": params},
                                      transforms.encoder_pixels(batch["pixels"]),
                                      method="image_tower")
    return {"embedding": embedding, "cls": cls.astype(jnp.float32)}

  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    embedding, cls = self.model.apply({"params": params}, batch["input_ids"],
                                      batch["attention_mask"], method="text_tower")
    return {"embedding": embedding, "cls": cls.astype(jnp.float32)}
