"""Autoregressive decoding, apart from any model: greedy, beam search and sampling.

A model takes part through two callables with one protocol (flax's gemma sampler keeps sampling
apart from the model the same way):

    logits_fn(tokens [N, T_step] int32, state) -> (logits [N, V] of the last position, state)

`state` is any pytree of per-row data that the model threads through steps: a key/value cache
(models/transformer.py), its own position counter, encoder states... The decoders call
`prefill_fn(prompt [B, P], state)` once (default: logits_fn itself), then `logits_fn(token [N, 1],
state)` once per further token, so the prefill may consume inputs the steps do not (e.g. the
encoder sequence whose cross-attention keys/values the cache keeps) and return a state of another
structure than the one it received. Parameters are closed over by the callables.

Everything runs under jax.jit with static shapes: `max_length` tokens are generated in a
lax.while_loop that stops once every row is finished; rows that produced EOS are padded with
`pad_id`. No Python loop runs over rows, the batch axis stays leading, and beam search folds its
beams into the batch axis as row b * beam_size + k, so a batch-sharded state stays sharded.
A cache must hold P + max_length - 1 positions (the last token is never fed back).

Conventions shared by the three decoders:
  * min_length: EOS is forbidden at generation steps t < min_length, so every sequence has at
    least min_length tokens before its EOS.
  * sequences [B, max_length] hold the generated tokens only (not the prompt), EOS included.
  * lengths count generated tokens, EOS included.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[[Array, Any], tuple[Array, Any]]
LENGTH_PENALTY_STYLES = ("power", "gnmt")
BEAM_RULES = ("exact", "transformers")
NEG_INF = -jnp.inf


@flax.struct.dataclass
class DecodeOutput:
  """sequences [B, max_length] int32 (pad_id after EOS); scores [B] float32: the sum of the
  model's log-probabilities (log_softmax of the raw logits) of the generated tokens."""

  sequences: Array
  scores: Array


@flax.struct.dataclass
class BeamSearchOutput:
  """The best finished hypothesis per row, and all beam_size of them, best first.

  scores are length-penalised: sum of log-probabilities / length_penalty(length).
  """

  sequences: Array       # [B, max_length]
  scores: Array          # [B]
  beam_sequences: Array  # [B, K, max_length]
  beam_scores: Array     # [B, K]


# --- logits processors ----------------------------------------------------------------------


def forbid_eos(logits: Array, eos_id: int, forbid: Array | bool) -> Array:
  """logits [..., V] with EOS at -inf where `forbid` (a scalar, e.g. step < min_length)."""
  return jnp.where(forbid, logits.at[..., eos_id].set(NEG_INF), logits)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
  """CTRL's rule (as transformers applies it): for tokens already seen ([B, V] bool), positive
  logits are divided by `penalty` and negative ones multiplied, making them less likely when
  penalty > 1."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


def top_k_filter(logits: Array, k: int) -> Array:
  """Keeps the k largest logits per row ([B, V]; ties with the k-th are kept), -inf elsewhere."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
  return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: Array, p: float) -> Array:
  """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p
  (always the most likely one), -inf elsewhere. logits [B, V]."""
  if p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
  keep = mass_before < p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


def length_penalty(length: Array | int, alpha: float, style: str) -> Array:
  """"power": length ** alpha (transformers' beam scorer); "gnmt": ((5 + length) / 6) ** alpha
  (Wu et al., 2016). Scores are log-probability sums divided by this."""
  length = jnp.asarray(length, jnp.float32)
  if style == "power":
    return length**alpha
  if style == "gnmt":
    return ((5.0 + length) / 6.0)**alpha
  raise ValueError(f"length_penalty_style={style!r} is not one of {LENGTH_PENALTY_STYLES}")


# --- greedy and sampling --------------------------------------------------------------------


def _seen_tokens(tokens: Array, vocab_size: int) -> Array:
  """[B, T] ids -> [B, V] bool: which tokens occur in each row."""
  return jnp.any(jax.nn.one_hot(tokens, vocab_size, dtype=jnp.bool_), axis=1)


def _decode(logits_fn: LogitsFn, prompt: Array, state: Any,
            choose: Callable[[Array, Array], Array], *, max_length: int, eos_id: int,
            pad_id: int, min_length: int, repetition_penalty: float,
            prefill_fn: LogitsFn | None) -> DecodeOutput:
  """The loop greedy and sampling share; choose(processed logits [B, V], step) -> ids [B]."""
  batch = prompt.shape[0]
  logits, state = (prefill_fn or logits_fn)(prompt, state)
  vocab_size = logits.shape[-1]
  penalise = repetition_penalty != 1.0
  seen = _seen_tokens(prompt, vocab_size) if penalise else jnp.zeros((batch, 0), bool)

  def select(step, logits, sequences, finished, scores, seen):
    logits = logits.astype(jnp.float32)  # [B, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    processed = forbid_eos(logits, eos_id, step < min_length)
    if penalise:
      processed = apply_repetition_penalty(processed, seen, repetition_penalty)
    tokens = jnp.where(finished, pad_id, choose(processed, step).astype(jnp.int32))  # [B]
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(finished, 0.0, chosen)
    sequences = jax.lax.dynamic_update_slice(sequences, tokens[:, None],
                                             (jnp.zeros((), jnp.int32), step))
    if penalise:
      seen = seen | jax.nn.one_hot(tokens, vocab_size, dtype=jnp.bool_)
    return tokens, sequences, finished | (tokens == eos_id), scores, seen

  sequences = jnp.full((batch, max_length), pad_id, jnp.int32)
  tokens, sequences, finished, scores, seen = select(
      jnp.zeros((), jnp.int32), logits, sequences, jnp.zeros((batch,), bool),
      jnp.zeros((batch,), jnp.float32), seen)

  def cond(carry):
    step, _, _, _, finished, _, _ = carry
    return (step < max_length) & ~jnp.all(finished)

  def body(carry):
    step, tokens, state, sequences, finished, scores, seen = carry
    logits, state = logits_fn(tokens[:, None], state)
    tokens, sequences, finished, scores, seen = select(
        step, logits, sequences, finished, scores, seen)
    return step + 1, tokens, state, sequences, finished, scores, seen

  carry = (jnp.ones((), jnp.int32), tokens, state, sequences, finished, scores, seen)
  _, _, _, sequences, _, scores, _ = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(sequences=sequences, scores=scores)


def greedy(logits_fn: LogitsFn, prompt: Array, state: Any, *, max_length: int, eos_id: int,
           pad_id: int, min_length: int = 0, repetition_penalty: float = 1.0,
           prefill_fn: LogitsFn | None = None) -> DecodeOutput:
  """The most likely next token at every step. prompt [B, P] int32 (P >= 1, unpadded)."""
  return _decode(logits_fn, prompt, state, lambda logits, step: jnp.argmax(logits, axis=-1),
                 max_length=max_length, eos_id=eos_id, pad_id=pad_id, min_length=min_length,
                 repetition_penalty=repetition_penalty, prefill_fn=prefill_fn)


def sample(logits_fn: LogitsFn, prompt: Array, state: Any, rng: Array, *, max_length: int,
           eos_id: int, pad_id: int, min_length: int = 0, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           prefill_fn: LogitsFn | None = None) -> DecodeOutput:
  """Ancestral sampling: repetition penalty, then temperature, top-k (0: off) and top-p (1.0:
  off), as transformers orders them. Deterministic under `rng`: step t draws with
  fold_in(rng, t), each row independently. rng may be one key per row ([B] keys): a row's
  tokens then depend on its own key only, not on the batch it is in or its place there."""
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature} (use greedy)")
  per_row = jnp.ndim(rng) == 1
  if per_row and rng.shape[0] != prompt.shape[0]:
    raise ValueError(f"{rng.shape[0]} keys for {prompt.shape[0]} rows")

  def draw(key, logits, step):
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1)

  def choose(logits, step):
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    if per_row:
      return jax.vmap(draw, in_axes=(0, 0, None))(rng, logits, step)
    return draw(rng, logits, step)

  return _decode(logits_fn, prompt, state, choose, max_length=max_length, eos_id=eos_id,
                 pad_id=pad_id, min_length=min_length, repetition_penalty=repetition_penalty,
                 prefill_fn=prefill_fn)


# --- beam search ----------------------------------------------------------------------------


def _map_batch_rows(fn: Callable[[Array], Array], state: Any, batch_axes: Any) -> Any:
  """Applies fn to every leaf with its batch axis moved first; leaves whose axis is None stay."""
  def apply(leaf, axis):
    if axis is None:
      return leaf
    return jnp.moveaxis(fn(jnp.moveaxis(leaf, axis, 0)), 0, axis)
  if batch_axes is None:
    batch_axes = jax.tree_util.tree_map(lambda leaf: None if jnp.ndim(leaf) == 0 else 0, state)
  return jax.tree_util.tree_map(apply, state, batch_axes)


def _gather_beams(x: Array, origin: Array) -> Array:
  """x [B * K, ...] (row b * K + k), origin [B, K'] beam indices -> [B * K', ...]."""
  batch, beams = origin.shape
  rows = x.reshape(batch, x.shape[0] // batch, *x.shape[1:])
  picked = jax.vmap(lambda row, idx: row[idx])(rows, origin)  # gathers within each batch row
  return picked.reshape(batch * beams, *x.shape[1:])


def beam_search(logits_fn: LogitsFn, prompt: Array, state: Any, *, beam_size: int,
                max_length: int, eos_id: int, pad_id: int, min_length: int = 0,
                alpha: float = 1.0, length_penalty_style: str = "power",
                state_batch_axes: Any = None,
                prefill_fn: LogitsFn | None = None, rules: str = "exact") -> BeamSearchOutput:
  """Beam search keeping beam_size live and beam_size finished hypotheses per row.

  A hypothesis finishes when it emits EOS or reaches max_length; its score is its log-probability
  sum divided by length_penalty(length, alpha, length_penalty_style) (see `length_penalty`).
  rules="exact": any of a step's 2K candidates may finish, and the loop stops early once no live
  hypothesis can beat the worst kept finished one (it never stops before the best is certain).
  rules="transformers": transformers' beam search (5.x) with its default early_stopping=False:
  only candidates ranked among the step's best beam_size may finish, and a row stops accepting
  finished hypotheses for good once its K finished slots are full and its best live sum over
  length_penalty(tokens generated so far) does not beat the worst of them (a heuristic: with
  alpha > 0 a longer hypothesis could still have won); the loop stops when every row has
  stopped. Its lengths are generated tokens, EOS included, as here (transformers 4.x before
  the decoder_prompt_len change divided by the whole length, prompt included, EOS excluded).
  state_batch_axes: a pytree like the post-prefill state giving each leaf's batch axis (None:
  shared by all rows, such as a cache index); default: axis 0 for arrays, scalars shared. For a
  transformer cache use transformer.cache_batch_axes(state). The prefill runs on the B prompts;
  its state is then repeated beam_size times along the batch axis (row b * beam_size + k).
  """
  if length_penalty_style not in LENGTH_PENALTY_STYLES:
    raise ValueError(f"length_penalty_style={length_penalty_style!r} is not one of "
                     f"{LENGTH_PENALTY_STYLES}")
  if rules not in BEAM_RULES:
    raise ValueError(f"rules={rules!r} is not one of {BEAM_RULES}")
  transformers_rules = rules == "transformers"
  batch, beams = prompt.shape[0], beam_size
  logits, state = (prefill_fn or logits_fn)(prompt, state)
  vocab_size = logits.shape[-1]
  if vocab_size < 2:
    raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {vocab_size}")
  state = _map_batch_rows(lambda x: jnp.repeat(x, beams, axis=0), state, state_batch_axes)
  logits = jnp.repeat(logits, beams, axis=0)  # [B * K, V]
  penalty = lambda length: length_penalty(length, alpha, length_penalty_style)  # noqa: E731

  def select(step, logits, live_seqs, live_scores, done_seqs, done_scores, settled):
    """Expands the live beams by one token; returns the new live/done beams, the live ones'
    origin beams [B, K] (to reorder the state) and last tokens [B * K], and which rows have
    stopped accepting finished hypotheses (rules="transformers"; [B])."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = forbid_eos(log_probs, eos_id, step < min_length).reshape(batch, beams, vocab_size)
    candidates = (live_scores[:, :, None] + log_probs).reshape(batch, beams * vocab_size)
    # 2K candidates: at most K of them end in EOS, so K live ones always remain (some may be
    # -inf, dead, when fewer than 2K candidates exist, e.g. at step 0 from beam 0 alone).
    top_scores, top_index = jax.lax.top_k(candidates, 2 * beams)  # [B, 2K]
    origin, tokens = top_index // vocab_size, top_index % vocab_size
    seqs = jnp.take_along_axis(live_seqs, origin[:, :, None], axis=1)  # [B, 2K, L]
    seqs = jax.lax.dynamic_update_slice(
        seqs, tokens[:, :, None].astype(jnp.int32), (jnp.zeros((), jnp.int32),) * 2 + (step,))
    ends = (tokens == eos_id) | (step == max_length - 1)
    if transformers_rules:  # only the best K may finish, and not in a row that has stopped
      ends = ends & (jnp.arange(2 * beams) < beams)[None, :] & ~settled[:, None]
    # Finished: keep the best K of the old finished and the candidates that end here.
    new_done = jnp.where(ends, top_scores / penalty(step + 1), NEG_INF)
    done_scores, keep = jax.lax.top_k(jnp.concatenate([done_scores, new_done], axis=1), beams)
    done_seqs = jnp.take_along_axis(jnp.concatenate([done_seqs, seqs], axis=1), keep[:, :, None],
                                    axis=1)
    # Live: the best K candidates that did not end in EOS.
    live_scores, keep = jax.lax.top_k(jnp.where(tokens == eos_id, NEG_INF, top_scores), beams)
    live_seqs = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    origin = jnp.take_along_axis(origin, keep, axis=1)
    last = jnp.take_along_axis(tokens, keep, axis=1).reshape(batch * beams).astype(jnp.int32)
    if transformers_rules:  # live_scores are sorted, best first
      full = jnp.all(done_scores > NEG_INF, axis=1)
      settled = settled | (full & (live_scores[:, 0] / penalty(step + 1)
                                   <= jnp.min(done_scores, axis=1)))
    return live_seqs, live_scores, done_seqs, done_scores, origin, last, settled

  live_seqs = jnp.full((batch, beams, max_length), pad_id, jnp.int32)
  # Only beam 0 is live at first: the K copies of a prompt would otherwise propose K times the
  # same candidates.
  live_scores = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1))
  done_seqs = jnp.full((batch, beams, max_length), pad_id, jnp.int32)
  done_scores = jnp.full((batch, beams), NEG_INF, jnp.float32)
  step = jnp.zeros((), jnp.int32)
  live_seqs, live_scores, done_seqs, done_scores, origin, last, settled = select(
      step, logits, live_seqs, live_scores, done_seqs, done_scores, jnp.zeros((batch,), bool))
  state = _map_batch_rows(lambda x: _gather_beams(x, origin), state, state_batch_axes)

  def cond(carry):
    step, _, _, _, live_scores, _, done_scores, settled = carry
    if transformers_rules:
      return (step < max_length) & ~jnp.all(settled)
    # Log-probabilities only fall, so a live beam's best reachable score is its current sum over
    # the largest penalty of the lengths still reachable (at one end: the penalty is monotone).
    best_penalty = jnp.maximum(penalty(step + 1), penalty(max_length))
    best_live = jnp.max(live_scores, axis=1) / best_penalty  # [B]
    certain = jnp.min(done_scores, axis=1) >= best_live
    return (step < max_length) & ~jnp.all(certain)

  def body(carry):
    step, last, state, live_seqs, live_scores, done_seqs, done_scores, settled = carry
    logits, state = logits_fn(last[:, None], state)
    live_seqs, live_scores, done_seqs, done_scores, origin, last, settled = select(
        step, logits, live_seqs, live_scores, done_seqs, done_scores, settled)
    state = _map_batch_rows(lambda x: _gather_beams(x, origin), state, state_batch_axes)
    return step + 1, last, state, live_seqs, live_scores, done_seqs, done_scores, settled

  carry = (step + 1, last, state, live_seqs, live_scores, done_seqs, done_scores, settled)
  *_, done_seqs, done_scores, _ = jax.lax.while_loop(cond, body, carry)
  return BeamSearchOutput(sequences=done_seqs[:, 0], scores=done_scores[:, 0],
                          beam_sequences=done_seqs, beam_scores=done_scores)
