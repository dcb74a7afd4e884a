"""BLIP's objectives against direct numpy transcriptions of the reference's formulas (and
PyTorch's label-smoothed cross-entropy for the LM loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flava_jax.losses import blip as losses


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _reference_itc(image, text, image_m, text_m, image_queue, text_queue, temp, alpha):
  """The reference's ITC: features are columns of [E, B + Q] matrices (its queue layout)."""
  image_all = np.concatenate([image_m.T, image_queue.T], axis=1)
  text_all = np.concatenate([text_m.T, text_queue.T], axis=1)
  sim_i2t_m = image_m @ text_all / temp
  sim_t2i_m = text_m @ image_all / temp
  targets = np.zeros(sim_i2t_m.shape)
  np.fill_diagonal(targets, 1)
  i2t_targets = alpha * np.exp(_log_softmax(sim_i2t_m)) + (1 - alpha) * targets
  t2i_targets = alpha * np.exp(_log_softmax(sim_t2i_m)) + (1 - alpha) * targets
  sim_i2t = image @ text_all / temp
  sim_t2i = text @ image_all / temp
  loss_i2t = -np.sum(_log_softmax(sim_i2t) * i2t_targets, axis=1).mean()
  loss_t2i = -np.sum(_log_softmax(sim_t2i) * t2i_targets, axis=1).mean()
  return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.4])
def test_itc_with_queue_and_distillation_equals_the_reference(alpha):
  rng = np.random.default_rng(0)
  b, q, e = 6, 12, 8
  arrays = [_unit(rng, b, e) for _ in range(4)] + [_unit(rng, q, e), _unit(rng, q, e)]
  temp = 0.07
  loss, sim_i2t, sim_t2i = losses.itc_loss(*(jnp.asarray(a, jnp.float32) for a in arrays),
                                           jnp.float32(temp), alpha)
  want, want_i2t, want_t2i = _reference_itc(*arrays, temp, alpha)
  assert abs(float(loss) - want) <= 1e-5 * max(1.0, abs(want))
  np.testing.assert_allclose(np.asarray(sim_i2t), want_i2t, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(sim_t2i), want_t2i, rtol=1e-5, atol=1e-4)


def test_itc_gradients_reach_the_online_features_and_temperature_only():
  rng = np.random.default_rng(1)
  arrays = [jnp.asarray(_unit(rng, 4, 8), jnp.float32) for _ in range(4)]
  queues = [jnp.asarray(_unit(rng, 8, 8), jnp.float32) for _ in range(2)]
  grads = jax.grad(lambda i, t, im, tm, temp: losses.itc_loss(i, t, im, tm, *queues, temp, 0.4)[0],
                   argnums=(0, 1, 2, 3, 4))(*arrays, jnp.float32(0.07))
  assert all(float(jnp.abs(g).sum()) > 0 for g in (grads[0], grads[1], grads[4]))
  assert float(jnp.abs(grads[2]).sum()) == float(jnp.abs(grads[3]).sum()) == 0.0


def _reference_weights(sim, block):
  """softmax over each row's block + 1e-4, 0 on the diagonal and outside the block."""
  rows = sim.shape[0]
  weights = np.zeros_like(sim)
  for start in range(0, rows, block):
    part = sim[start:start + block, start:start + block]
    w = np.exp(_log_softmax(part)) + 1e-4
    np.fill_diagonal(w, 0)
    weights[start:start + block, start:start + block] = w
  return weights


@pytest.mark.parametrize("block", [2, 4, 8])
def test_negative_weights_are_the_references_within_each_block(block):
  sim = np.random.default_rng(2).normal(size=(8, 8)) * 3
  got = np.asarray(losses.negative_weights(jnp.asarray(sim, jnp.float32), block))
  np.testing.assert_allclose(got, _reference_weights(sim, block), rtol=1e-5, atol=1e-7)


def test_negative_sampling_follows_the_weights_and_is_deterministic_under_a_key():
  rng = np.random.default_rng(3)
  sim = rng.normal(size=(4, 4)) * 2
  weights = _reference_weights(sim, 4)
  draws = jax.jit(jax.vmap(lambda k: losses.sample_rows(jnp.asarray(weights, jnp.float32), k)))(
      jax.random.split(jax.random.key(0), 20000))
  draws = np.asarray(draws)  # [N, 4]
  for row in range(4):
    freq = np.bincount(draws[:, row], minlength=4) / len(draws)
    want = weights[row] / weights[row].sum()
    assert freq[row] == 0.0  # never the pair itself
    np.testing.assert_allclose(freq, want, atol=0.015)  # 3 sigma at n = 20000
  key = jax.random.key(7)
  a = losses.hard_negatives(jnp.asarray(sim), jnp.asarray(sim.T), key, 4)
  b = losses.hard_negatives(jnp.asarray(sim), jnp.asarray(sim.T), key, 4)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_device_scope_negatives_stay_in_their_block_and_take_rows_gathers_them():
  sim = np.random.default_rng(4).normal(size=(16, 16))
  image_neg, text_neg = losses.hard_negatives(jnp.asarray(sim), jnp.asarray(sim), jax.random.key(0),
                                              4)
  rows = np.arange(16)
  for neg in (np.asarray(image_neg), np.asarray(text_neg)):
    assert np.all(neg // 4 == rows // 4) and np.all(neg != rows)
  x = np.random.default_rng(5).normal(size=(16, 3, 2)).astype(np.float32)
  for block in (4, 16):
    got = losses.take_rows(jnp.asarray(x), jnp.asarray(image_neg), block)
    np.testing.assert_array_equal(np.asarray(got), x[np.asarray(image_neg)])


def test_itm_loss_is_the_mean_two_way_cross_entropy():
  logits = np.random.default_rng(6).normal(size=(9, 2))
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
  loss, accuracy = losses.itm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  want = -np.mean(_log_softmax(logits)[np.arange(9), labels])
  assert abs(float(loss) - want) <= 1e-6
  assert float(accuracy) == pytest.approx(np.mean(logits.argmax(1) == labels))
  # A head that ignores its input and predicts the 1:2 prior sits at 0.6365.
  prior = np.log(np.array([[2 / 3, 1 / 3]] * 9))
  assert float(losses.itm_loss(jnp.asarray(prior, jnp.float32), jnp.asarray(labels))[0]) == (
      pytest.approx(0.6365, abs=1e-4))


@pytest.mark.parametrize("smoothing,prompt", [(0.0, 0), (0.1, 0), (0.1, 3)])
def test_lm_loss_equals_pytorchs_label_smoothed_cross_entropy(smoothing, prompt):
  rng = np.random.default_rng(7)
  batch, length, vocab = 3, 7, 11
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  ids = rng.integers(1, vocab, (batch, length))
  lengths = np.array([7, 5, 4])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * mask
  targets = losses.lm_targets(jnp.asarray(ids), jnp.asarray(mask), prompt)
  loss, count = losses.lm_loss(jnp.asarray(logits), targets, smoothing)
  labels = np.where(mask == 1, ids, -100)
  labels[:, :prompt] = -100
  fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=smoothing)
  want = fn(torch.tensor(logits[:, :-1]).reshape(-1, vocab), torch.tensor(labels[:, 1:]).reshape(-1))
  assert abs(float(loss) - float(want)) <= 1e-5
  assert int(count) == int((labels[:, 1:] != -100).sum())


def test_momentum_update_and_enqueue():
  rng = np.random.default_rng(8)
  m, p = rng.normal(size=(5,)), rng.normal(size=(5,))
  got = losses.momentum_update({"w": jnp.asarray(m)}, {"w": jnp.asarray(p)}, 0.995)["w"]
  np.testing.assert_allclose(np.asarray(got), 0.995 * m + 0.005 * p, rtol=1e-6)
  queue = np.zeros((8, 2), np.float32)
  features = np.arange(8, dtype=np.float32).reshape(4, 2) + 1
  q, ptr = losses.enqueue(jnp.asarray(queue), jnp.int32(4), jnp.asarray(features))
  assert int(ptr) == 0  # wrapped: 4 + 4 = 8 = Q
  np.testing.assert_array_equal(np.asarray(q)[4:], features)
  np.testing.assert_array_equal(np.asarray(q)[:4], 0)
