"""Greedy, beam search and sampling (models/decoding.py) on toy step functions and a tiny LM.

The toy models are tables of logits indexed by (row, step, previous token), so beam search can be
checked against brute-force enumeration of every sequence.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flava_jax.models import decoding, transformer
from tests.models import tiny_lm

PAD, EOS, BOS = 0, 1, 2


def table_logits_fn(tokens, state):
  """A toy model whose next-token logits depend on the row, the step and the last two tokens.

  state: {"table": [N, L, V, V, V] logits per (row, step, previous, the one before), "before":
  [N] the token before the last one (per row, so beam search must reorder it), "step": []}.
  """
  rows = jnp.arange(tokens.shape[0])
  logits = state["table"][rows, state["step"], tokens[:, -1], state["before"]]
  return logits, dict(state, before=tokens[:, -1], step=state["step"] + 1)


def table_state(table):
  table = jnp.asarray(table, jnp.float32)
  if table.ndim == 4:  # no dependence on the token before the last
    table = jnp.broadcast_to(table[..., None, :], table.shape[:-1] + table.shape[-1:] * 2)
  return {"table": table, "before": jnp.full((table.shape[0],), BOS, jnp.int32),
          "step": jnp.zeros((), jnp.int32)}


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(
      -1, keepdims=True)


def brute_force(table, max_length, min_length, penalty):
  """Every hypothesis of one row ([L, V, V, V] table): [(tokens, length-penalised score)], best
  first."""
  log_probs = log_softmax(table)
  vocab = table.shape[-1]
  found = {}
  for seq in itertools.product(range(vocab), repeat=max_length):
    total, previous, before, hypothesis = 0.0, BOS, BOS, []
    for step, token in enumerate(seq):
      if token == EOS and step < min_length:
        break
      total += log_probs[step, previous, before, token]
      hypothesis.append(token)
      previous, before = token, previous
      if token == EOS or step == max_length - 1:
        found[tuple(hypothesis)] = total / penalty(len(hypothesis))
        break
  return sorted(found.items(), key=lambda item: -item[1])


def _padded(tokens, length):
  return list(tokens) + [PAD] * (length - len(tokens))


# --- beam search --------------------------------------------------------------------------


def test_beam_search_finds_what_greedy_misses():
  """Greedy takes the likelier first token (3: 0.5), whose continuations are all unlikely; beam
  search finds 4 then EOS (0.4 * 0.9)."""
  probs = np.full((3, 6, 6), 1e-3)
  probs[0, BOS, [3, 4, 5]] = [0.5, 0.4, 0.1]
  probs[1, 3, [3, 4, 5, EOS]] = 0.25
  probs[1, 4, EOS] = 0.9
  probs[2, :, EOS] = 0.9
  table = np.log(probs / probs.sum(-1, keepdims=True))[None]
  prompt = jnp.full((1, 1), BOS, jnp.int32)
  greedy = jax.jit(functools.partial(decoding.greedy, table_logits_fn, max_length=3, eos_id=EOS,
                                     pad_id=PAD))(prompt, table_state(table))
  assert greedy.sequences[0, 0] == 3
  beam = jax.jit(functools.partial(decoding.beam_search, table_logits_fn, beam_size=2,
                                   max_length=3, eos_id=EOS, pad_id=PAD, alpha=0.0))(
                                       prompt, table_state(table))
  np.testing.assert_array_equal(beam.sequences, [[4, EOS, PAD]])
  best = brute_force(table_state(table)["table"][0], 3, 0, lambda n: 1.0)[0]
  assert best[0] == (4, EOS)
  np.testing.assert_allclose(beam.scores, [best[1]], rtol=1e-5)
  assert float(beam.scores[0]) > float(greedy.scores[0])


@pytest.mark.parametrize("style, alpha, min_length", [("power", 1.0, 0), ("gnmt", 0.6, 1),
                                                      ("power", -0.5, 0)])
def test_exhaustive_beam_search_equals_brute_force(style, alpha, min_length):
  """With beam_size >= every live prefix (4 non-EOS tokens, 3 steps: 16), beam search is exact:
  its beam_size finished hypotheses are the best ones of the enumeration, with their scores. The
  logits depend on the last two tokens, so a state not reordered by beam would be caught."""
  vocab, max_length, beams = 5, 3, 16
  tables = np.random.default_rng(7).normal(0.0, 2.0, (2, max_length, vocab, vocab, vocab))
  prompt = jnp.full((2, 1), BOS, jnp.int32)
  search = jax.jit(functools.partial(
      decoding.beam_search, table_logits_fn, beam_size=beams, max_length=max_length, eos_id=EOS,
      pad_id=PAD, min_length=min_length, alpha=alpha, length_penalty_style=style))
  out = search(prompt, table_state(tables))
  penalty = lambda n: float(decoding.length_penalty(n, alpha, style))  # noqa: E731
  for row in range(2):
    expected = brute_force(tables[row], max_length, min_length, penalty)[:beams]
    np.testing.assert_allclose(out.beam_scores[row], [s for _, s in expected], rtol=1e-5)
    np.testing.assert_array_equal(out.beam_sequences[row, :3],
                                  [_padded(seq, max_length) for seq, _ in expected[:3]])
    np.testing.assert_array_equal(out.sequences[row], _padded(expected[0][0], max_length))
    if min_length:
      assert all(EOS not in seq[:min_length] for seq, _ in expected)


def test_length_penalty_styles():
  np.testing.assert_allclose(decoding.length_penalty(4, 0.6, "gnmt"), (9 / 6)**0.6, rtol=1e-6)
  np.testing.assert_allclose(decoding.length_penalty(4, 0.6, "power"), 4**0.6, rtol=1e-6)
  with pytest.raises(ValueError, match="length_penalty_style"):
    decoding.length_penalty(4, 0.6, "wu")


# --- greedy and sampling ------------------------------------------------------------------


def test_greedy_pads_after_eos_and_respects_min_length():
  table = np.zeros((1, 4, 6, 6))
  table[0, :, :, EOS] = 5.0  # EOS is always the most likely token
  table[0, :, :, 4] = 3.0
  prompt = jnp.full((1, 1), BOS, jnp.int32)
  run = lambda **kw: jax.jit(functools.partial(  # noqa: E731
      decoding.greedy, table_logits_fn, max_length=4, eos_id=EOS, pad_id=PAD, **kw))(
          prompt, table_state(table))
  np.testing.assert_array_equal(run().sequences, [[EOS, PAD, PAD, PAD]])
  np.testing.assert_array_equal(run(min_length=2).sequences, [[4, 4, EOS, PAD]])
  log_probs = log_softmax(table[0, 0, 0])
  np.testing.assert_allclose(run(min_length=2).scores, [2 * log_probs[4] + log_probs[EOS]],
                             rtol=1e-5)


def _fixed_distribution_fn(logits):
  """The same next-token logits [V] at every step and row."""
  def logits_fn(tokens, state):
    return jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (tokens.shape[0], len(logits))), state
  return logits_fn


def _sample(logits_fn, batch, rng, max_length=4, **kw):
  prompt = jnp.full((batch, 1), BOS, jnp.int32)
  run = jax.jit(functools.partial(decoding.sample, logits_fn, max_length=max_length, eos_id=EOS,
                                  pad_id=PAD, **kw))
  return run(prompt, {}, rng).sequences


def test_sampling_is_deterministic_under_a_key():
  tables = np.random.default_rng(0).normal(0.0, 1.0, (32, 5, 8, 8))
  prompt = jnp.full((32, 1), BOS, jnp.int32)
  run = jax.jit(functools.partial(decoding.sample, table_logits_fn, max_length=5, eos_id=EOS,
                                  pad_id=PAD))
  first = run(prompt, table_state(tables), jax.random.key(1))
  again = run(prompt, table_state(tables), jax.random.key(1))
  other = run(prompt, table_state(tables), jax.random.key(2))
  np.testing.assert_array_equal(first.sequences, again.sequences)
  np.testing.assert_array_equal(first.scores, again.scores)
  assert np.mean(np.asarray(first.sequences) != np.asarray(other.sequences)) > 0.3


def test_top_k_sampling_draws_only_the_k_most_likely_tokens():
  logits = [-9.0, -9.0, 0.5, 2.0, 1.0, 1.5, 0.0, 1.2]  # PAD and EOS unlikely; top 3: 3, 5, 7
  seen = np.unique(_sample(_fixed_distribution_fn(logits), 256, jax.random.key(0), top_k=3))
  np.testing.assert_array_equal(seen, [3, 5, 7])


def test_top_p_sampling_draws_only_the_nucleus():
  probs = np.array([1e-6, 1e-6, 0.45, 0.3, 0.1, 0.08, 0.04, 0.03])
  # Mass before each token, best first: 0, 0.45, 0.75, ...: p=0.7 keeps tokens 2 and 3.
  seen = np.unique(_sample(_fixed_distribution_fn(np.log(probs)), 256, jax.random.key(0),
                           top_p=0.7))
  np.testing.assert_array_equal(seen, [2, 3])
  everything = np.unique(_sample(_fixed_distribution_fn(np.log(probs)), 256, jax.random.key(0)))
  assert len(everything) >= 5


def test_low_temperature_sampling_is_greedy():
  tables = np.random.default_rng(3).normal(0.0, 1.0, (8, 5, 8, 8))
  prompt = jnp.full((8, 1), BOS, jnp.int32)
  common = dict(max_length=5, eos_id=EOS, pad_id=PAD)
  greedy = decoding.greedy(table_logits_fn, prompt, table_state(tables), **common)
  cold = jax.jit(functools.partial(decoding.sample, table_logits_fn, temperature=1e-4, **common))(
      prompt, table_state(tables), jax.random.key(5))
  np.testing.assert_array_equal(cold.sequences, greedy.sequences)


def test_filters_and_repetition_penalty():
  logits = jnp.asarray([[2.0, -1.0, 0.5, 4.0, 0.0]])
  seen = jnp.asarray([[True, True, False, False, True]])
  np.testing.assert_allclose(decoding.apply_repetition_penalty(logits, seen, 2.0),
                             [[1.0, -2.0, 0.5, 4.0, 0.0]])
  np.testing.assert_array_equal(decoding.top_k_filter(logits, 2),
                                [[2.0, -np.inf, -np.inf, 4.0, -np.inf]])
  probs = jax.nn.softmax(logits)[0]  # [0.11, 0.006, 0.025, 0.84, 0.015]
  assert 0.8 < probs[3] < 0.9
  np.testing.assert_array_equal(decoding.top_p_filter(logits, 0.8),
                                [[-np.inf, -np.inf, -np.inf, 4.0, -np.inf]])
  np.testing.assert_array_equal(decoding.top_p_filter(logits, 0.9),
                                [[2.0, -np.inf, -np.inf, 4.0, -np.inf]])


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
  logits = [-9.0, -9.0, 0.0, 3.0, 2.0, 1.0]  # always token 3 without the penalty
  run = lambda penalty: decoding.greedy(  # noqa: E731
      _fixed_distribution_fn(logits), jnp.full((1, 1), BOS, jnp.int32), {}, max_length=3,
      eos_id=EOS, pad_id=PAD, repetition_penalty=penalty).sequences
  np.testing.assert_array_equal(run(1.0), [[3, 3, 3]])
  # Step 1: 3 is seen (3 / 2 = 1.5 < 2), so 4; step 2: 3 -> 1.5, 4 -> 1.0, 5 -> 1.0, so 3 again
  # (the penalty applies once per seen token, whatever its count).
  np.testing.assert_array_equal(run(2.0), [[3, 4, 3]])


# --- the tiny LM with its key/value cache, jitted and on a 2-device data mesh --------------


def _lm_setup(batch=4, max_length=5):
  model = tiny_lm.make_model(cross_attention=True)
  encoder = tiny_lm.encoder_inputs(batch)
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, tiny_lm.VOCAB, (batch, 2)), jnp.int32)
  params = tiny_lm.init_params(model, batch, 4, encoder)
  capacity = prompt.shape[1] + max_length - 1
  cache = tiny_lm.empty_cache(model, batch, capacity, encoder)
  state = {"cache": cache, "encoder": encoder[0], "encoder_mask": encoder[1]}
  return model, params, prompt, state, encoder


def test_cached_beam_search_scores_are_the_model_scores():
  """The cache is tiled and reordered by beam like any state: every beam's score equals the
  length-penalised log-probability of its tokens under a full (uncached) forward pass."""
  model, params, prompt, state, encoder = _lm_setup()
  prefill_fn, logits_fn = tiny_lm.cached_step_fns(model, params)
  beams, max_length, alpha = 3, 5, 0.6
  axes = {"cache": transformer.cache_batch_axes(state["cache"])}
  out = jax.jit(lambda p, s: decoding.beam_search(
      logits_fn, p, s, prefill_fn=prefill_fn, state_batch_axes=axes, beam_size=beams,
      max_length=max_length, eos_id=EOS, pad_id=PAD, min_length=3, alpha=alpha,
      length_penalty_style="gnmt"))(prompt, state)
  batch, prompt_length = prompt.shape
  sequences = np.asarray(out.beam_sequences).reshape(batch * beams, max_length)
  tokens = np.concatenate([np.repeat(prompt, beams, axis=0), sequences], axis=1)
  logits = model.apply({"params": params}, jnp.asarray(tokens), None,
                       *(jnp.repeat(x, beams, axis=0) for x in encoder))
  log_probs = log_softmax(np.asarray(logits))[:, prompt_length - 1:-1]  # predicting each token
  for row, sequence in enumerate(sequences):
    length = (list(sequence).index(EOS) + 1) if EOS in sequence else max_length
    total = sum(log_probs[row, t, sequence[t]] for t in range(length))
    expected = total / ((5 + length) / 6)**alpha
    np.testing.assert_allclose(out.beam_scores.reshape(-1)[row], expected, rtol=1e-4)
    assert (sequence[length:] == PAD).all()
  for row in range(batch):  # distinct hypotheses per row
    assert len({tuple(s) for s in sequences[row * beams:(row + 1) * beams]}) == beams


def test_decoders_on_a_two_device_data_mesh():
  """Greedy, beam search and sampling with the batch (and the cache's batch axis) sharded over
  two devices give what they give on one."""
  model, params, prompt, state, _ = _lm_setup()
  prefill_fn, logits_fn = tiny_lm.cached_step_fns(model, params)
  axes = {"cache": transformer.cache_batch_axes(state["cache"])}
  common = dict(max_length=5, eos_id=EOS, pad_id=PAD, prefill_fn=prefill_fn)

  def decode_all(prompt, state, rng):
    return (decoding.greedy(logits_fn, prompt, state, min_length=1, **common),
            decoding.beam_search(logits_fn, prompt, state, beam_size=2, state_batch_axes=axes,
                                 **common),
            decoding.sample(logits_fn, prompt, state, rng, top_k=5, top_p=0.9,
                            repetition_penalty=1.3, **common))

  rng = jax.random.key(0)
  single = jax.jit(decode_all)(prompt, state, rng)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))

  def put(x, axis):  # the batch axis sharded over "data"; None: replicated
    return jax.device_put(x, NamedSharding(mesh, P(*[
        "data" if i == axis else None for i in range(x.ndim)])))

  sharded_state = dict(
      encoder=put(state["encoder"], 0), encoder_mask=put(state["encoder_mask"], 0),
      cache=jax.tree_util.tree_map(put, state["cache"], axes["cache"]))
  with jax.set_mesh(mesh):
    on_mesh = jax.jit(decode_all)(put(prompt, 0), sharded_state, rng)
  for got, want in zip(on_mesh, single):
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
