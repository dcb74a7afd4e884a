"""The dVAE image tokenizer (DALL-E's discrete VAE, stage one) as a task.

    python -m flava_jax.main --config=configs/dvae.py --workdir=/tmp/flava_dvae
    python -m flava_jax.main --config.init.dvae_from=/tmp/flava_dvae ...   # its codes as targets

Objective: the encoder's logits over the codebook at each of the (H/8, W/8) positions are relaxed
with Gumbel-softmax at temperature tau; the decoder maps the relaxed codes to logit-Laplace
statistics of every pixel. Loss per pixel value:
    NLL(x | decoder(z)) + beta * KL(softmax(logits) || uniform) * positions / pixel values
(the ELBO of the whole image divided by its H*W*C values). tau anneals 1 -> 1/16 and beta ramps
0 -> kl_weight with the step. The images are the dVAE views of the image and paired corpora, at
the size FLAVA feeds the tokenizer (14 x 8 = 112 px for FLAVA-full): `config.model` only fixes
that geometry. Both corpus kinds feed one train step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import flops
from flava_jax.data import pipeline
from flava_jax.models.config import DVAEConfig, FlavaConfig, dvae_view_size
from flava_jax.models.dvae import LOGIT_LAPLACE_EPS, DVAE, init_dvae_params, map_pixels, unmap_pixels
from flava_jax.parse import dataclass_from_dict
from flava_jax.tasks.base import LossOutput, StepContext, Task

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DVAETrainingConfig:
  kl_weight: float = 6.6            # beta after its ramp (DALL-E)
  kl_warmup_steps: int = 5000       # beta ramps linearly from 0
  temperature_start: float = 1.0
  temperature_end: float = 1 / 16
  temperature_steps: int = 150_000  # tau anneals (cosine) over these steps, then stays
  eval_examples: int = 256          # held-out images for the end-of-run figures

  def __post_init__(self):
    if self.kl_weight < 0:
      raise ValueError(f"dvae_training.kl_weight must be >= 0, got {self.kl_weight}")
    if not 0 < self.temperature_end <= self.temperature_start:
      raise ValueError("dvae_training temperatures must satisfy 0 < temperature_end <= "
                       f"temperature_start, got {self.temperature_start} -> "
                       f"{self.temperature_end}")
    for name in ("kl_warmup_steps", "temperature_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"dvae_training.{name} must be >= 0")


def temperature(cfg: DVAETrainingConfig, step: Array) -> Array:
  frac = jnp.clip(step / max(cfg.temperature_steps, 1), 0.0, 1.0)
  log_start, log_end = math.log(cfg.temperature_start), math.log(cfg.temperature_end)
  # Cosine in log space: tau goes 1 -> 1/16 smoothly, spending time at both ends.
  return jnp.exp(log_end + 0.5 * (log_start - log_end) * (1 + jnp.cos(jnp.pi * frac)))


def kl_weight(cfg: DVAETrainingConfig, step: Array) -> Array:
  if cfg.kl_warmup_steps == 0:
    return jnp.asarray(cfg.kl_weight, jnp.float32)
  return cfg.kl_weight * jnp.clip(step / cfg.kl_warmup_steps, 0.0, 1.0)


def logit_laplace_nll(x: Array, stats: Array, channels: int) -> Array:
  """-log p(x) per value under the logit-Laplace; x are mapped pixels in [eps, 1 - eps]."""
  mu, log_b = stats[..., :channels], stats[..., channels:]
  x = jnp.clip(x, LOGIT_LAPLACE_EPS * 0.5, 1 - LOGIT_LAPLACE_EPS * 0.5)
  logit_x = jnp.log(x) - jnp.log1p(-x)
  return (jnp.abs(logit_x - mu) * jnp.exp(-log_b) + log_b + math.log(2.0)
          + jnp.log(x) + jnp.log1p(-x))


def dvae_loss(dvae: DVAE, params: Any, pixels: Array, rng: Array, tau: Array, beta: Array
              ) -> tuple[Array, dict[str, Array]]:
  """ELBO loss per pixel value of a batch of mapped pixels [B, H, W, C]; metrics."""
  cfg = dvae.config
  logits = dvae.apply({"params": params}, pixels, method="logits")  # [B, h, w, V] float32
  gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
  relaxed = jax.nn.softmax((logits + gumbel) / tau, axis=-1)
  stats = dvae.apply({"params": params}, relaxed, method="decode")
  nll = logit_laplace_nll(pixels.astype(jnp.float32), stats, cfg.output_channels)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  q = jnp.exp(log_q)
  kl = jnp.sum(q * (log_q + math.log(cfg.vocab_size)), axis=-1)  # [B, h, w]
  values_per_image = math.prod(pixels.shape[1:])
  positions = math.prod(logits.shape[1:3])
  rec = jnp.mean(nll)
  kl_mean = jnp.mean(kl)
  loss = rec + beta * kl_mean * positions / values_per_image
  recon = jax.nn.sigmoid(stats[..., :cfg.output_channels])
  mse = jnp.mean(jnp.square(unmap_pixels(recon) - unmap_pixels(pixels)))
  mean_q = jnp.mean(q.reshape(-1, cfg.vocab_size), axis=0)
  perplexity = jnp.exp(-jnp.sum(mean_q * jnp.log(mean_q + 1e-10)))
  return loss, {"reconstruction_nll": rec, "kl": kl_mean, "mse": mse, "perplexity": perplexity,
                "temperature": tau, "kl_weight": beta}


def dvae_logical_axes(dvae: DVAE, image_size: int) -> Any:
  """The dVAE parameters' logical axis names (a tree of PartitionSpecs); nothing allocated."""
  return nn.get_partition_spec(jax.eval_shape(
      lambda: init_dvae_params(dvae, jax.random.key(0), image_size=image_size, boxed=True)))


def dvae_input(rgb: Array) -> Array:
  """uint8 RGB -> the dVAE's input: /255, then x -> 0.8 x + 0.1."""
  return map_pixels(rgb.astype(jnp.float32) / 255.0)


class DVAETask(Task):
  """Trains the dVAE (encoder and decoder) on the dVAE views of image and paired corpora."""

  NAME = "dvae"
  SECTIONS = ("model", "dvae", "dvae_training")
  SCALARS = {"paired_text_length": int, "text_length": int}
  WARM_STARTS = {"model_from": None}

  def __init__(self, config: Mapping[str, Any]):
    model = FlavaConfig.from_dict(config["model"])
    self.image, self.text = model.image, model.text
    self.dvae_config = DVAEConfig.from_dict(config["dvae"])
    if not self.dvae_config.decoder:
      raise ValueError("dvae.decoder must be True to train the dVAE")
    self.training = dataclass_from_dict(DVAETrainingConfig, config["dvae_training"],
                                        "dvae_training")
    self.paired_text_length = config["paired_text_length"]
    self.text_length = config["text_length"]
    self.dvae = DVAE(self.dvae_config)
    self.image_size = dvae_view_size(self.image, self.dvae_config)

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("image", "paired")

  def check_corpus(self, kind: str, where: str) -> None:
    if kind == "text":
      raise ValueError(f"{where} is a text corpus; the dVAE trains on images (image or paired "
                       "corpora)")
    super().check_corpus(kind, where)

  def step_kind(self, corpus_kind: str) -> str:
    return "image"  # a paired corpus's images feed the same step

  def data_shapes(self) -> pipeline.Shapes:
    return pipeline.Shapes(
        image_size=self.image.image_size, patch_size=self.image.patch_size,
        dvae_size=self.image_size, paired_text_length=self.paired_text_length,
        text_length=self.text_length, text_vocab_size=self.text.vocab_size,
        text_pad_id=self.text.pad_token_id)

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    return pipeline.flava_processors(data_cfg, kinds, self.data_shapes(), train)

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, channels = self.image_size, self.dvae_config.input_channels
    return {"dvae_pixels": jax.ShapeDtypeStruct((rows, size, size, channels), jnp.uint8)}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    shape = self.batch_spec(kind, rows)["dvae_pixels"].shape
    return {"dvae_pixels": np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)}

  def init_params(self, rng: Array) -> Any:
    return init_dvae_params(self.dvae, rng, image_size=self.image_size)

  def logical_axes(self) -> Any:
    return dvae_logical_axes(self.dvae, self.image_size)

  def decays(self, path: tuple[str, ...]) -> bool:
    return bool(path) and path[-1] == "kernel"

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    del kind, extra, frozen
    tau, beta = temperature(self.training, ctx.step), kl_weight(self.training, ctx.step)
    loss, metrics = dvae_loss(self.dvae, params, dvae_input(batch["dvae_pixels"]), rng, tau, beta)
    return LossOutput(loss, metrics)

  def step_flops(self, kind: str, global_batch: int) -> float:
    return global_batch * flops.dvae_train_flops(self.dvae_config, self.image_size)

  def describe(self, params: Any) -> str:
    cfg = self.dvae_config
    return (f"dVAE ({self.image_size} px -> {self.image_size // cfg.downsample}^2 codes of "
            f"{cfg.vocab_size})")

  def predict(self) -> "DVAEPredictor":
    return DVAEPredictor(self.dvae, self.image_size)


@dataclasses.dataclass(frozen=True)
class DVAEPredictor:
  """What evaluators call on a dVAE (evals/reconstruction.py); it reads no text."""

  dvae: DVAE
  image_size: int  # the dVAE view's pixels per side
  text_length: int = 0
  text_vocab_size: int = 0
  max_text_length: int = 0

  @property
  def codebook_size(self) -> int:
    return self.dvae.config.vocab_size

  def logical_axes(self) -> Any:
    return dvae_logical_axes(self.dvae, self.image_size)

  def reconstruct(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"codes": [B, h, w] argmax codes, "squared_error": [B] mean over pixels in [0, 1]}."""
    pixels = batch["pixels"]
    codes = self.dvae.apply({"params": params}, dvae_input(pixels), method="tokens")
    grid = pixels.shape[1] // self.dvae.config.downsample
    recon = self.dvae.apply({"params": params}, codes, (grid, grid), method="reconstruct")
    target = pixels.astype(jnp.float32) / 255.0
    error = jnp.mean(jnp.square(recon.astype(jnp.float32) - target), axis=(1, 2, 3))
    return {"codes": codes.reshape(codes.shape[0], -1), "squared_error": error}
