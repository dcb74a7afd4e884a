"""BLIP's objectives: momentum-distilled ITC with feature queues, ITM with hard negatives, and
the captioning LM with label smoothing. Pure functions of global arrays (the batch axis sharded
over the data-parallel mesh axes inside jit; XLA inserts the collectives).

    loss, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                      image_queue, text_queue, temp, alpha)
    neg_image, neg_text = hard_negatives(sim_t2i[:, :B], sim_i2t[:, :B], rng, block)
    lm = lm_loss(logits, ids, mask, label_smoothing=0.1)

Every example is contrasted with the momentum features of the whole global batch plus the
queue. The reference, per GPU, contrasts its own rows with its own momentum rows plus the queue
(the queue holding every GPU's rows of past steps); on one device the two are the same, and
here the loss does not change with the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IGNORE = -100  # target id of positions left out of the LM loss (PyTorch's ignore_index)


def _soft_cross_entropy(logits: Array, targets: Array) -> Array:
  """mean over rows of -sum(log_softmax(logits) * targets)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(log_probs * targets, axis=-1))


def itc_loss(image_feat: Array, text_feat: Array, image_feat_m: Array, text_feat_m: Array,
             image_queue: Array, text_queue: Array, temp: Array, alpha: Array | float
             ) -> tuple[Array, Array, Array]:
  """Image-text contrastive loss with momentum distillation (BLIP's ITC).

  image_feat/text_feat [B, E]: L2-normalised online features; *_m: the momentum encoders'
  (gradients stopped here); *_queue [Q, E]: earlier steps' momentum features. temp: the
  temperature (a divisor). Targets: alpha * softmax(momentum similarities) + (1 - alpha) *
  one-hot of the pair's own column. Returns (loss, sim_i2t, sim_t2i), the online similarities
  [B, B + Q] (columns: this batch's momentum features, then the queue).
  """
  image_feat_m, text_feat_m = jax.lax.stop_gradient((image_feat_m, text_feat_m))
  image_all = jax.lax.stop_gradient(jnp.concatenate([image_feat_m, image_queue], axis=0))
  text_all = jax.lax.stop_gradient(jnp.concatenate([text_feat_m, text_queue], axis=0))
  temp = temp.astype(jnp.float32)
  dot = lambda a, b: jnp.einsum("be,ne->bn", a.astype(jnp.float32), b.astype(jnp.float32),  # noqa: E731
                                precision=jax.lax.Precision.HIGHEST)
  batch = image_feat.shape[0]
  own = jax.nn.one_hot(jnp.arange(batch), image_all.shape[0], dtype=jnp.float32)
  sim_i2t_m = jax.lax.stop_gradient(dot(image_feat_m, text_all) / temp)
  sim_t2i_m = jax.lax.stop_gradient(dot(text_feat_m, image_all) / temp)
  targets_i2t = alpha * jax.nn.softmax(sim_i2t_m, axis=-1) + (1 - alpha) * own
  targets_t2i = alpha * jax.nn.softmax(sim_t2i_m, axis=-1) + (1 - alpha) * own
  sim_i2t = dot(image_feat, text_all) / temp
  sim_t2i = dot(text_feat, image_all) / temp
  loss = 0.5 * (_soft_cross_entropy(sim_i2t, targets_i2t)
                + _soft_cross_entropy(sim_t2i, targets_t2i))
  return loss, sim_i2t, sim_t2i


def negative_weights(sim: Array, block: int) -> Array:
  """BLIP's sampling weights of hard negatives, [B, B]: softmax of each row's similarities to
  the candidates + 1e-4, the pair itself 0. Candidates: the rows of the same block of `block`
  rows (the reference pretraining: one device's rows) or every row (block = B: the retrieval
  fine-tuning's negative_all_rank); 0 elsewhere."""
  rows = sim.shape[0]
  if block < 2 or rows % block:
    raise ValueError(f"hard negatives need blocks of >= 2 rows dividing the batch; got "
                     f"block={block}, batch={rows}")
  index = jnp.arange(rows)
  same_block = (index[:, None] // block) == (index[None, :] // block)
  logits = jnp.where(same_block, sim.astype(jnp.float32), -jnp.inf)
  weights = jnp.where(same_block, jax.nn.softmax(logits, axis=-1) + 1e-4, 0.0)
  return jnp.where(index[:, None] == index[None, :], 0.0, weights)


def sample_rows(weights: Array, rng: Array) -> Array:
  """One column per row drawn with probability proportional to weights [B, N] (torch's
  multinomial(weights, 1)). Row r draws with fold_in(rng, r): the draw of a row depends only on
  its global index, so it is the same on every mesh."""
  keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(weights.shape[0]))
  logits = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
  return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, logits).astype(jnp.int32)


def hard_negatives(sim_t2i: Array, sim_i2t: Array, rng: Array, block: int
                   ) -> tuple[Array, Array]:
  """(negative image per text [B], negative text per image [B]): row indices of the batch drawn
  from `negative_weights` of the batch block of the online similarities (sim_t2i[:, :B])."""
  sim_t2i, sim_i2t = jax.lax.stop_gradient((sim_t2i, sim_i2t))
  image_rng, text_rng = jax.random.split(rng)
  return (sample_rows(negative_weights(sim_t2i, block), image_rng),
          sample_rows(negative_weights(sim_i2t, block), text_rng))


def take_rows(x: Array, index: Array, block: int) -> Array:
  """x[index] for [B, ...] x and global row indices [B] that stay within blocks of `block` rows
  when block < B (so each data-parallel shard gathers its own rows only)."""
  rows = x.shape[0]
  if block >= rows:
    return jnp.take(x, index, axis=0)
  blocks = rows // block
  local = (index % block).reshape(blocks, block)
  grouped = x.reshape(blocks, block, *x.shape[1:])
  picked = jax.vmap(lambda g, i: jnp.take(g, i, axis=0))(grouped, local)
  return picked.reshape(x.shape)


def itm_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
  """(mean 2-way cross-entropy, accuracy) of logits [N, 2] against labels [N] (1 = match)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, accuracy


def lm_targets(ids: Array, mask: Array, prompt_length: int = 0) -> Array:
  """The decoder's targets: the ids with padding (and the first `prompt_length` tokens, a
  captioning prompt) set to IGNORE. Position 0 ([DEC]) is never predicted."""
  targets = jnp.where(mask.astype(bool), ids, IGNORE)
  if prompt_length:
    targets = targets.at[:, :prompt_length].set(IGNORE)
  return targets


def lm_loss(logits: Array, targets: Array, label_smoothing: float = 0.0
            ) -> tuple[Array, Array]:
  """Shifted next-token cross-entropy (position t predicts target t + 1), with label smoothing
  as PyTorch's CrossEntropyLoss applies it: (1 - eps) * NLL + eps * mean over the vocabulary of
  -log p; averaged over the targets that are not IGNORE. Returns (loss, token count)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = targets[:, 1:]
  valid = targets != IGNORE
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  per_token = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
  count = jnp.sum(valid)
  loss = jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(count, 1)
  return loss, count


def momentum_update(momentum: Array, online: Array, rate: float) -> Array:
  """p_m <- rate * p_m + (1 - rate) * p (elementwise; any pytree via jax.tree.map)."""
  return jax.tree.map(lambda m, p: rate * m + (1 - rate) * p.astype(m.dtype), momentum, online)


def enqueue(queue: Array, pointer: Array, features: Array) -> tuple[Array, Array]:
  """Writes features [B, E] over the queue's [Q, E] rows pointer .. pointer + B - 1 (the oldest),
  and advances the pointer by B modulo Q. Q must be a multiple of B (checked at start-up)."""
  rows = features.shape[0]
  queue = jax.lax.dynamic_update_slice(queue, features.astype(queue.dtype),
                                       (pointer, jnp.zeros((), pointer.dtype)))
  return queue, (pointer + rows) % queue.shape[0]
