"""The tri-modal pretrainer's objectives (losses/omni.py) against direct numpy transcriptions of
their formulas on the same inputs (1e-5), and the sample-level replacements: every class leaves
exactly the pairs it names matched, inside each shard's rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flava_jax.losses import omni

RNG = np.random.default_rng(0)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_feature_regression_is_the_mean_squared_error_of_weighted_positions():
  pred, target = RNG.normal(size=(3, 5, 7)), RNG.normal(size=(3, 5, 7))
  weights = RNG.random((3, 5)) < 0.4
  weights[0, 0] = True
  loss, count = omni.feature_regression(jnp.asarray(pred, jnp.float32),
                                        jnp.asarray(target, jnp.float32), jnp.asarray(weights))
  per_position = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(float(loss), per_position[weights].mean(), rtol=1e-5)
  assert float(count) == weights.sum()
  # the target is a stopped gradient: only the prediction learns
  grad = jax.grad(lambda t: omni.feature_regression(jnp.asarray(pred, jnp.float32), t,
                                                    jnp.asarray(weights))[0])(
                                                        jnp.asarray(target, jnp.float32))
  assert float(jnp.abs(grad).max()) == 0.0


def test_frame_contrastive_is_cross_entropy_over_the_utterances_frames():
  rows, frames, dim, temperature = 3, 6, 4, 0.1
  queries, features = RNG.normal(size=(rows, frames, dim)), RNG.normal(size=(rows, frames, dim))
  real = np.arange(frames)[None] < np.array([6, 4, 5])[:, None]
  masked = (RNG.random((rows, frames)) < 0.5) & real
  masked[:, 0] = True
  loss, count = omni.frame_contrastive(jnp.asarray(queries, jnp.float32),
                                       jnp.asarray(features, jnp.float32), jnp.asarray(masked),
                                       jnp.asarray(real), temperature)
  losses = []
  for b in range(rows):
    for t in range(frames):
      if not masked[b, t]:
        continue
      q = queries[b, t] / np.linalg.norm(queries[b, t])
      candidates = [s for s in range(frames) if real[b, s]]  # the same utterance's frames
      sims = np.array([q @ features[b, s] / np.linalg.norm(features[b, s]) for s in candidates])
      logp = _log_softmax(sims / temperature)
      losses.append(-logp[candidates.index(t)])  # its own original feature is the positive
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
  assert float(count) == masked.sum()


def test_next_token_and_match_losses_are_cross_entropies():
  logits, targets = RNG.normal(size=(2, 4, 9)), RNG.integers(0, 9, (2, 4))
  weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  loss, _ = omni.next_token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                 jnp.asarray(weights))
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (nll * weights).sum() / weights.sum(), rtol=1e-5)
  logits, classes = RNG.normal(size=(6, 5)), np.array([0, 1, 2, 3, 4, 0])
  loss, accuracy = omni.match_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(classes))
  nll = -_log_softmax(logits)[np.arange(6), classes]
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
  assert float(accuracy) == pytest.approx(np.mean(logits.argmax(-1) == classes))


# models/omni.MATCH_CLASSES: which of the pairs (text-image, text-audio, image-audio) stay matched.
MATCHED_PAIRS = {0: {"ti", "ta", "ia"}, 1: {"ia"}, 2: {"ta"}, 3: {"ti"}, 4: set()}


@pytest.mark.parametrize("local_batch", [3, 4, 8])
def test_every_class_leaves_exactly_its_pairs_matched_within_the_shard(local_batch):
  batch = 24
  classes = jnp.asarray(np.tile(np.arange(5), 5)[:batch])
  for seed in range(20):
    src = {k: np.asarray(v) for k, v in
           omni.match_sources(classes, local_batch, jax.random.key(seed)).items()}
    for row in range(batch):
      t, i, a = src["text"][row], src["image"][row], src["audio"][row]
      pairs = {name for name, (x, y) in (("ti", (t, i)), ("ta", (t, a)), ("ia", (i, a)))
               if x == y}
      assert pairs == MATCHED_PAIRS[int(classes[row])], (row, int(classes[row]), t, i, a)
      for r in (t, i, a):  # every source in the row's shard
        assert r // local_batch == row // local_batch
      # a modality kept is the row's own; the text is never taken from elsewhere but in class 1
      assert (t == row) == (int(classes[row]) != 1)


def test_replacement_shifts_vary_and_small_shards_are_refused():
  classes = jnp.full((12,), 4)
  seen = {tuple(np.asarray(omni.match_sources(classes, 6, jax.random.key(s))["audio"][:1]))
          for s in range(40)}
  assert len(seen) >= 3  # a random shift, not a fixed neighbour
  with pytest.raises(ValueError, match="local batch >= 3"):
    omni.match_sources(jnp.zeros((8,), jnp.int32), 2, jax.random.key(0))


def test_loss_config_checks_its_fields():
  with pytest.raises(ValueError, match="loss.dir=-1"):
    omni.LossConfig(dir=-1)
  with pytest.raises(ValueError, match="mam_temperature"):
    omni.LossConfig(mam_temperature=0.0)
  with pytest.raises(ValueError, match="nothing to train"):
    omni.LossConfig(**{name: 0.0 for name in omni.OBJECTIVES})
  assert set(itertools.chain(omni.OBJECTIVES)) <= set(omni.LossConfig.__dataclass_fields__)
