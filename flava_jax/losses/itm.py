"""Image-text matching: negatives made inside the step, the 2-way loss, and the row weights that
drop negative pairs from MMM and from the contrastive rows."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flava_jax.losses.masked import token_cross_entropy

Array = jax.Array


def derangement_shift(batch_size: int, local_batch: int, rng: Array) -> Array:
  """Source row for every row: a random cyclic shift inside each group of `local_batch` rows.

  A non-zero cyclic shift maps no row to itself (a derangement), and staying inside the
  data-parallel shard's rows keeps the exchange on-device. Returns int32 [batch_size].
  """
  if local_batch < 2 or batch_size % local_batch:
    raise ValueError(f"ITM negatives need a local batch >= 2 dividing the batch; got "
                     f"local_batch={local_batch}, batch={batch_size}")
  shift = jax.random.randint(rng, (), 1, local_batch)
  rows = jnp.arange(batch_size)
  return (rows // local_batch) * local_batch + (rows % local_batch + shift) % local_batch


def make_negatives(text: Mapping[str, Array], rng: Array, negative_rate: float,
                   local_batch: int) -> tuple[dict[str, Array], Array]:
  """Replaces the caption of each pair with probability `negative_rate` by another row's caption.

  text: arrays with a leading batch axis that travel together (ids, masked ids, attention mask,
  MLM labels). Returns (new text arrays, itm_labels [B] int32: 1 = matching pair, 0 = negative).
  """
  batch = next(iter(text.values())).shape[0]
  pick_rng, shift_rng = jax.random.split(rng)
  negative = jax.random.bernoulli(pick_rng, negative_rate, (batch,))
  source = derangement_shift(batch, local_batch, shift_rng)
  swapped = {}
  for name, value in text.items():
    other = jnp.take(value, source, axis=0)
    cond = negative.reshape((batch,) + (1,) * (value.ndim - 1))
    swapped[name] = jnp.where(cond, other, value)
  return swapped, (~negative).astype(jnp.int32)


def positive_row_weights(itm_labels: Array) -> Array:
  """1 for matching pairs, 0 for negatives; all ones when no pair matches (the reference's rule)."""
  positive = itm_labels != 0
  return jnp.where(jnp.any(positive), positive, True).astype(jnp.float32)


def itm_loss(logits: Array, itm_labels: Array) -> Array:
  """Mean 2-way cross-entropy over all pairs. logits [B, 2], labels [B]."""
  return jnp.mean(token_cross_entropy(logits, itm_labels))


def itm_accuracy(logits: Array, itm_labels: Array) -> Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == itm_labels).astype(jnp.float32))
