"""Training FLAVA's image tokenizer, the DALL-E discrete VAE, from scratch (its own binary).

    python -m flava_jax.train_dvae --config=configs/dvae.py --workdir=/tmp/flava_dvae
    python -m flava_jax.main --config.init.dvae_from=/tmp/flava_dvae ...   # its codes as targets

Objective (DALL-E, stage one): the encoder's logits over the codebook at each of the (H/8, W/8)
positions are relaxed with Gumbel-softmax at temperature tau; the decoder maps the relaxed codes
to logit-Laplace statistics of every pixel. Loss per pixel value:
    NLL(x | decoder(z)) + beta * KL(softmax(logits) || uniform) * positions / pixel values
(the ELBO of the whole image divided by its H*W*C values). tau anneals 1 -> 1/16 and beta ramps
0 -> kl_weight. The images are the dVAE views of the image and paired corpora, at the size FLAVA
feeds the tokenizer (14 x 8 = 112 px for FLAVA-full). The loop, checkpoints, resume, SIGTERM and
metrics are the FLAVA trainer's (flava_jax/trainer.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import flops, sharding, train, trainer
from flava_jax.data import pipeline, transforms
from flava_jax.evaluate import eval_rows
from flava_jax.model_summary import num_parameters
from flava_jax.models.config import DVAEConfig, FlavaConfig, dataclass_from_dict, dvae_view_size
from flava_jax.models.dvae import LOGIT_LAPLACE_EPS, DVAE, init_dvae_params, unmap_pixels

Array = jax.Array

DVAE_SECTIONS = ("model", "dvae", "dvae_training", "checkpoint", "optimizer", "data", "sharding")


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


def make_dvae_step(dvae: DVAE, tx, cfg: DVAETrainingConfig, mesh, state_shardings: Any,
                   grad_accum: int = 1):
  """step(state, {"dvae_pixels": uint8 [B, H, W, C]}, rng) -> (state, metrics); jitted, donated."""

  def step(state: train.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    tau, beta = temperature(cfg, state.step), kl_weight(cfg, state.step)

    def loss_fn(params, micro, r):
      return dvae_loss(dvae, params, transforms.dvae_pixels(micro["dvae_pixels"]), r, tau, beta)

    (loss, metrics), grads = train.accumulated_value_and_grad(
        loss_fn, state.params, batch, rng, grad_accum, mesh)
    return train.apply_gradients(tx, state, grads, dict(metrics, loss=loss))

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def run(state, batch, rng):
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)

  run.jitted = jitted
  return run


def evaluate_dvae(config: Any, dvae: DVAE, params: Any, examples: int) -> dict[str, float]:
  """Held-out figures: reconstruction MSE / PSNR through the argmax codes, and code usage."""
  rows = eval_rows(config, "image", limit=examples)
  pixels = np.stack([r["dvae_pixels"] for r in rows])
  shapes = pipeline.Shapes.from_config(config)
  grid = shapes.grid
  params = jax.device_get(params)

  @jax.jit
  def reconstruct(p, x):
    codes = dvae.apply({"params": p}, transforms.dvae_pixels(x), method="tokens")
    return dvae.apply({"params": p}, codes, (grid, grid), method="reconstruct"), codes

  recon, codes = reconstruct(params, jnp.asarray(pixels))
  target = pixels.astype(np.float32) / 255.0
  mse = float(np.mean(np.square(np.asarray(recon) - target)))
  counts = np.bincount(np.asarray(codes).ravel(), minlength=dvae.config.vocab_size)
  p = counts / counts.sum()
  return {"mse": mse, "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
          "codes_used": int((counts > 0).sum()),
          "code_perplexity": float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))),
          "examples": len(pixels)}


def check_config(config: Any) -> None:
  """Start-up checks of a dVAE training config (no data read, no compile); errors name fields."""
  trainer.check_fields(config, DVAE_SECTIONS)
  FlavaConfig.from_dict(config.model)
  if not DVAEConfig.from_dict(config.dvae).decoder:
    raise ValueError("dvae.decoder must be True to train the dVAE")
  dataclass_from_dict(DVAETrainingConfig, config.dvae_training, "dvae_training")
  dataclass_from_dict(train.OptimizerConfig, config.optimizer, "optimizer")
  dataclass_from_dict(trainer.CheckpointConfig, config.checkpoint, "checkpoint")
  _, corpora = pipeline.data_config(config.data)
  for name, corpus in corpora.items():
    if corpus.kind == "text":
      raise ValueError(f"data.corpora.{name} is a text corpus; the dVAE trains on images "
                       "(image or paired corpora)")
  trainer.check_batch(config, sharding.make_mesh(config.sharding.mesh))


def train_dvae(config: Any, workdir: str, stop_after: int | None = None) -> dict[str, Any]:
  """Trains the dVAE for config.total_steps (resuming from workdir); held-out figures at the end."""
  check_config(config)
  mesh = sharding.make_mesh(config.sharding.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  dvae_cfg = DVAEConfig.from_dict(config.dvae)
  dvae = DVAE(dvae_cfg)
  image_size = dvae_view_size(FlavaConfig.from_dict(config.model).image, dvae_cfg)
  training = dataclass_from_dict(DVAETrainingConfig, config.dvae_training, "dvae_training")
  optimizer_cfg = dataclass_from_dict(train.OptimizerConfig, config.optimizer, "optimizer")
  ckpt_cfg = dataclass_from_dict(trainer.CheckpointConfig, config.checkpoint, "checkpoint")
  tx = train.make_optimizer(optimizer_cfg, config.total_steps)
  with trainer.Session(config, workdir) as session:
    workdir = session.workdir
    data = pipeline.make_pipeline(config)
    try:
      rng = jax.random.key(config.seed)
      init_fn = lambda r: init_dvae_params(dvae, r, image_size=image_size)
      logical = nn.get_partition_spec(jax.eval_shape(
          lambda: init_dvae_params(dvae, jax.random.key(0), image_size=image_size, boxed=True)))
      param_shardings = sharding.logical_to_shardings(logical, mesh, rules)
      state, shardings = train.create_state(init_fn, tx, param_shardings, mesh,
                                            trainer.init_key(config.seed), rules)
    except BaseException:
      data.close()
      raise
    if jax.process_index() == 0:
      print(f"dVAE {config.get('variant', '')}: {num_parameters(state.params):,} parameters, "
            f"{image_size} px -> {image_size // dvae_cfg.downsample}^2 codes of "
            f"{dvae_cfg.vocab_size}; mesh {dict(mesh.shape)}; corpora {data.kinds}; global "
            f"batch {config.global_batch}", flush=True)
    step_fn = make_dvae_step(dvae, tx, training, mesh, shardings, config.get("grad_accum", 1))
    kinds = sorted(set(data.kinds.values()))
    run = trainer.Run(
        config=config, workdir=workdir, mesh=mesh, data=data, state=state,
        steps={k: step_fn for k in kinds},
        step_flops={k: config.global_batch * flops.dvae_train_flops(dvae_cfg, image_size)
                    for k in kinds},
        schedule=train.learning_rate_schedule(optimizer_cfg, config.total_steps),
        checkpoint=ckpt_cfg, rng=rng, session=session, final_evals=1,
        host_batch=lambda batch: {"dvae_pixels": batch["dvae_pixels"]})
    state, step, stopped = trainer.run_loop(run, stop_after)
    if stopped or session.stop.requested:
      if not stopped:
        print(f"{session.stop.requested}: stopped before the final evaluation (training is "
              "complete; a rerun evaluates)", flush=True)
      return {"stopped_at": step, "state": state}
    if trainer.final_metrics_logged(workdir, step, "eval/"):
      print(f"the final evaluation at step {step} is already in {trainer.METRICS_FILE}: not "
            "run again", flush=True)
      return {"state": state}
    results = evaluate_dvae(config, dvae, state.params, training.eval_examples)
    trainer.write_metrics(workdir, step, {f"eval/{k}": v for k, v in results.items()})
  print(f"held-out dVAE ({results['examples']} images): reconstruction MSE {results['mse']:.4f} "
        f"(PSNR {results['psnr']:.1f} dB), {results['codes_used']} of {dvae_cfg.vocab_size} "
        f"codes used, perplexity {results['code_perplexity']:.1f}; use it with "
        f"--config.init.dvae_from={workdir}", flush=True)
  results["state"] = state
  return results


def main(argv):
  trainer.run_binary(argv, check_config, train_dvae)


if __name__ == "__main__":
  from absl import app as _app, flags as _flags  # pylint: disable=g-multiple-import
  from ml_collections import config_flags

  _REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "dvae.py"),
                                  "an ml_collections config file, e.g. configs/dvae.py:full",
                                  lock_config=True)
  _flags.DEFINE_string("workdir", "/tmp/flava_dvae", "where checkpoints and metrics go")
  _flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize()")
  _app.run(main)
