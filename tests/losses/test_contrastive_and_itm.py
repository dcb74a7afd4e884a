"""The global contrastive loss equals the single-device loss on any mesh, gradients included;
ITM negatives are derangements, reproducible from the rng."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flava_jax import sharding
from flava_jax.losses import contrastive, itm
from tests.trees import assert_trees_close

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
          dict(data=2, fsdp=2, tensor=2)]


def _embeddings(batch=16, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  image, text = (rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(2))
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  weights = (rng.random(batch) < 0.75).astype(np.float32)
  return image, text, weights


def _numpy_loss(image, text, scale, weights):
  logits = image @ text.T * np.exp(scale)
  def ce(l):
    l = l - l.max(axis=1, keepdims=True)
    return -(np.diag(l) - np.log(np.exp(l).sum(axis=1)))
  w = weights / weights.sum()
  return 0.5 * (np.sum(w * ce(logits)) + np.sum(w * ce(logits.T)))


def test_single_device_loss_matches_numpy():
  image, text, weights = _embeddings()
  got = contrastive.contrastive_loss_single(jnp.asarray(image), jnp.asarray(text),
                                            jnp.float32(2.0), jnp.asarray(weights))
  assert float(got) == pytest.approx(_numpy_loss(image, text, 2.0, weights), abs=1e-5)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s.values())))
def test_global_loss_and_gradients_equal_single_device(sizes):
  image, text, weights = _embeddings()
  scale = jnp.float32(2.3)
  grad_fn = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731
  ref_loss, ref_grads = grad_fn(lambda a, b, s: contrastive.contrastive_loss_single(
      a, b, s, jnp.asarray(weights)))(image, text, scale)
  mesh = sharding.make_mesh(sizes)
  batch = sharding.batch_sharding(mesh)
  args = (jax.device_put(image, batch), jax.device_put(text, batch), scale)
  with jax.set_mesh(mesh):  # the ambient mesh is picked up when none is passed
    w = jax.device_put(weights, batch)
    loss, grads = grad_fn(lambda a, b, s: contrastive.global_contrastive_loss(a, b, s, w))(*args)
    # Each device holds only its [local, global] block: the gather is explicit in the HLO.
    hlo = jax.jit(lambda a, b: contrastive.global_contrastive_loss(a, b, scale)).lower(
        *args[:2]).as_text()
  assert "all-gather" in hlo or "all_gather" in hlo
  assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
  assert_trees_close(grads, ref_grads, atol=1e-6)


def test_local_loss_contrasts_within_each_shard_only():
  image, text, weights = _embeddings()
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=2))
  batch = sharding.batch_sharding(mesh)
  got = jax.jit(lambda a, b, w: contrastive.local_contrastive_loss(a, b, jnp.float32(2.3), w,
                                                                   mesh=mesh))(
      *(jax.device_put(x, batch) for x in (image, text, weights)))
  # Reference: per-shard [4, 4] problems, pooled with the row weights.
  sums, total = 0.0, weights.sum()
  for k in range(4):
    rows = slice(4 * k, 4 * k + 4)
    w = weights[rows]
    if w.sum():
      sums += _numpy_loss(image[rows], text[rows], 2.3, w) * w.sum()
  assert float(got) == pytest.approx(sums / total, abs=1e-5)
  assert float(got) < _numpy_loss(image, text, 2.3, weights)  # fewer negatives, easier task


def test_itm_negatives_are_derangements_within_shards():
  batch, local = 16, 4
  for seed in range(20):
    source = np.asarray(itm.derangement_shift(batch, local, jax.random.key(seed)))
    rows = np.arange(batch)
    assert np.all(source != rows)
    assert np.all(source // local == rows // local)  # stays on the shard's rows
    assert sorted(source) == list(rows)  # a permutation
  with pytest.raises(ValueError, match="local batch"):
    itm.derangement_shift(8, 1, jax.random.key(0))


def test_itm_negatives_rate_labels_and_reproducibility():
  batch = 64
  ids = jnp.arange(batch)[:, None] * jnp.ones((1, 5), jnp.int32)
  text = {"input_ids": ids, "attention_mask": jnp.ones((batch, 5), jnp.int32)}
  fractions = []
  for seed in range(50):
    swapped, labels = itm.make_negatives(text, jax.random.key(seed), 0.5, local_batch=16)
    negative = np.asarray(labels) == 0
    changed = np.asarray(swapped["input_ids"][:, 0]) != np.arange(batch)
    np.testing.assert_array_equal(negative, changed)  # label 0 exactly where the caption moved
    fractions.append(negative.mean())
  assert abs(np.mean(fractions) - 0.5) < 4 * np.sqrt(0.25 / (50 * batch))
  a = itm.make_negatives(text, jax.random.key(3), 0.1, 16)
  b = itm.make_negatives(text, jax.random.key(3), 0.1, 16)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  weights = itm.positive_row_weights(jnp.array([0, 0, 0]))
  np.testing.assert_array_equal(np.asarray(weights), [1, 1, 1])  # no positive: all rows count
  np.testing.assert_array_equal(np.asarray(itm.positive_row_weights(jnp.array([1, 0, 1]))),
                                [1, 0, 1])
