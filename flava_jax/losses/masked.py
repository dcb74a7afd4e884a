"""Masked prediction losses (MIM, MLM, MMM-image, MMM-text): weighted token cross-entropy.

Which positions count is carried by float weights of the labels' shape (0 = ignored), never by
gathering a variable number of positions, so every shape is static inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
IGNORE_INDEX = -100  # the label value transformers and the data pipeline use for "no target"


def token_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-position cross-entropy in float32. logits [..., V], labels [...] (any int; out-of-range
  labels must carry weight 0 and give a finite, unused value)."""
  logits = logits.astype(jnp.float32)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
  label_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - label_logit


def weighted_mean(values: Array, weights: Array) -> tuple[Array, Array]:
  """(sum(w * v) / sum(w), sum(w)); 0 when nothing is weighted."""
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1e-9), total


def masked_prediction_loss(logits: Array, labels: Array, weights: Array
                           ) -> tuple[Array, Array]:
  """Mean cross-entropy over the weighted positions: ([], count). logits [B, T, V]; labels and
  weights [B, T]. The mean is over tokens of the whole batch, as the reference averages them."""
  return weighted_mean(token_cross_entropy(logits, labels), weights)


def label_weights(labels: Array, row_weights: Array | None = None) -> Array:
  """Weights 1 where labels != IGNORE_INDEX, times optional per-row weights [B]."""
  weights = (labels != IGNORE_INDEX).astype(jnp.float32)
  if row_weights is not None:
    weights = weights * row_weights.astype(jnp.float32)[:, None]
  return weights


def prediction_slots(weights: Array, slots: int) -> Array | None:
  """The positions [B, slots] of each row's weighted positions, in order, padded with unweighted
  ones; None when slots is 0 (predict everywhere).

  A row with more weighted positions than slots keeps its first `slots`; `slot_overflow` counts
  what that drops (the data pipeline caps masks at the slot counts, so it stays 0 in training).
  """
  if not slots:
    return None
  length = weights.shape[1]
  if slots > length:
    raise ValueError(f"{slots} prediction slots for rows of {length} positions")
  index = jnp.arange(length, dtype=jnp.int32)
  # Weighted positions score above every unweighted one; earlier positions score higher.
  score = jnp.where(weights > 0, 2 * length - index, -index)
  return jax.lax.top_k(score, slots)[1]


def take_slots(values: Array, positions: Array | None) -> Array:
  """values [B, T] at positions [B, K] (or all of them when positions is None)."""
  return values if positions is None else jnp.take_along_axis(values, positions, axis=1)


def slot_overflow(weights: Array, slot_weights: Array) -> Array:
  """How many weighted positions the slots left out (0 when every label found a slot)."""
  return jnp.sum((weights > 0).astype(jnp.float32)) - jnp.sum(
      (slot_weights > 0).astype(jnp.float32))
