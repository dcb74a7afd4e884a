"""The tri-modal pretrainer's objectives (OPT; tasks/omni.py), as functions of arrays.

Token level
  MLM              cross-entropy at the masked text tokens (losses/masked.py)
  MVM regression   mean over masked patches of the mean squared error between the regressed and
                   the (stopped-gradient) input patch feature (models/omni.py standardises it)
  MVM class        cross-entropy of the masked patch's dVAE code
  MAM regression   the same as MVM regression over masked audio frames and their conv features
  MAM contrastive  for each masked frame t of an utterance: cross-entropy of softmax over the
                   utterance's real frames s of cos(q_t, f_s) / temperature, target s = t (the
                   frame's own original feature is the positive, the others the negatives)
Modality level
  DTR, DIR         teacher-forced next-token cross-entropy of the text decoder (WordPieces) and
                   of the image decoder (dVAE codes)
Sample level
  match            softmax cross-entropy over the 5 classes (models/omni.MATCH_CLASSES). The
                   paper writes a sigmoid with a one-hot target; the softmax form has the same
                   target and one winner per row.

Every mean is over the positions (or rows) that count in the whole batch, weighted by float
masks, so shapes stay static and sharded batches give the one-device value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flava_jax.losses.masked import token_cross_entropy, weighted_mean

Array = jax.Array
OBJECTIVES = ("mlm", "mvm_regression", "mvm_class", "mam_regression", "mam_contrastive", "dtr",
              "dir", "match")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Each objective's weight in the total (0 leaves it out of the step) and MAM's temperature."""

  mlm: float = 1.0
  mvm_regression: float = 1.0
  mvm_class: float = 1.0
  mam_regression: float = 1.0
  mam_contrastive: float = 1.0
  dtr: float = 1.0
  dir: float = 1.0
  match: float = 1.0
  mam_temperature: float = 0.1

  def __post_init__(self):
    for name in OBJECTIVES:
      if getattr(self, name) < 0:
        raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0")
    if not self.mam_temperature > 0:
      raise ValueError(f"loss.mam_temperature={self.mam_temperature} must be > 0")
    if not any(getattr(self, name) for name in OBJECTIVES):
      raise ValueError("every loss weight is 0: nothing to train")


def feature_regression(predicted: Array, target: Array, weights: Array) -> tuple[Array, Array]:
  """([], count): mean over weighted positions of mean((predicted - stop_grad(target))^2) over
  the feature axis. predicted, target [B, T, C]; weights [B, T]."""
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  error = jnp.mean(jnp.square(predicted.astype(jnp.float32) - target), axis=-1)
  return weighted_mean(error, weights)


def frame_contrastive(queries: Array, features: Array, masked: Array, real: Array,
                      temperature: float) -> tuple[Array, Array]:
  """([], count): MAM's contrastive form. queries [B, F, C] (from the masked frames' outputs),
  features [B, F, C] (the original frame features, gradient stopped), masked [B, F] (which
  frames count), real [B, F] (the utterance's frames: the candidates)."""
  q = queries.astype(jnp.float32)
  f = jax.lax.stop_gradient(features.astype(jnp.float32))
  q = q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, -1, keepdims=True), 1e-12))
  f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, -1, keepdims=True), 1e-12))
  logits = jnp.einsum("btc,bsc->bts", q, f) / temperature
  logits = jnp.where(real.astype(bool)[:, None, :], logits, -1e30)
  frames = jnp.arange(logits.shape[1])
  labels = jnp.broadcast_to(frames[None], logits.shape[:2])
  return weighted_mean(token_cross_entropy(logits, labels), masked)


def next_token_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """([], count): mean cross-entropy of logits [B, T, V] against targets [B, T] where weighted."""
  return weighted_mean(token_cross_entropy(logits, targets), weights)


def match_sources(classes: Array, local_batch: int, rng: Array) -> dict[str, Array]:
  """The row each modality of each row is taken from for the sample-level task.

  classes [B] int (models/omni.MATCH_CLASSES): 0 keeps all three; 1 replaces the text, 2 the
  image, 3 the audio; 4 replaces the image and the audio by two other rows' (so no pair is left
  matched). Replacements come from other rows of the same block of `local_batch` rows (the
  data-parallel shard): two random non-zero cyclic shifts s1 != s2 per step. Returns {text,
  image, audio: int32 [B]} global row indices."""
  batch = classes.shape[0]
  if local_batch < 3 or batch % local_batch:
    raise ValueError(f"the match task needs a local batch >= 3 dividing the batch; got "
                     f"local_batch={local_batch}, batch={batch}")
  first_rng, second_rng = jax.random.split(rng)
  s1 = jax.random.randint(first_rng, (), 1, local_batch)
  u = jax.random.randint(second_rng, (), 1, local_batch - 1)
  s2 = jnp.where(u < s1, u, u + 1)  # in [1, local_batch) and != s1
  rows = jnp.arange(batch)
  block, offset = (rows // local_batch) * local_batch, rows % local_batch
  shift = lambda s: block + (offset + s) % local_batch
  other, third = shift(s1), shift(s2)
  return {"text": jnp.where(classes == 1, other, rows).astype(jnp.int32),
          "image": jnp.where((classes == 2) | (classes == 4), other, rows).astype(jnp.int32),
          "audio": jnp.where(classes == 3, other,
                             jnp.where(classes == 4, third, rows)).astype(jnp.int32)}


def match_loss(logits: Array, classes: Array) -> tuple[Array, Array]:
  """(mean 5-way softmax cross-entropy, accuracy) over the rows."""
  ce = token_cross_entropy(logits, classes)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == classes).astype(jnp.float32))
  return jnp.mean(ce), accuracy
