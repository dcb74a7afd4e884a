"""Generation with the tri-modal model's decoders (models/omni.py): text (greedy, e.g. speech to
text from the audio alone) and images (dVAE codes sampled top-k, for the dVAE's decoder).

    hidden, keys = ...                         # the cross-modal outputs and their key mask
    out = decode_text(model, params, hidden, keys, start_id=cls, eos_id=sep, pad_id=0,
                      max_length=32)           # out.sequences [B, 32] after [CLS]
    codes = sample_codes(model, params, hidden, keys, rng, top_k=32)   # [B, P]

Both feed the decoder's key/value cache (models/transformer.py) through models/decoding.py: the
prefill projects the cross-modal sequence's keys/values once per layer and caches them, each
step feeds one token at the next position. Everything is jittable with static settings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flava_jax.models import decoding
from flava_jax.models.omni import OmniModel

Array = jax.Array


def _decoder(model: OmniModel, params: Any, method: str, hidden: Array, keys: Array,
             prompt: Array, length: int):
  """(prefill_fn, logits_fn, state) of one decoder for `length` positions."""

  def apply(cache, tokens, encoder, encoder_mask, position):
    args = (tokens, None) if method == "text_decoder_logits" else (tokens,)
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    return model.apply(variables, *args, encoder, encoder_mask, decode=True, start=position,
                       method=method, mutable=["cache"])

  dummy = jnp.zeros((prompt.shape[0], length), jnp.int32)
  shapes = jax.eval_shape(lambda: apply(None, dummy, hidden, keys, 0)[1]["cache"])
  state = {"cache": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
           "position": jnp.zeros((), jnp.int32)}

  def prefill_fn(tokens, state):
    logits, variables = apply(state["cache"], tokens, hidden, keys, state["position"])
    return logits[:, -1], {"cache": variables["cache"],
                           "position": state["position"] + tokens.shape[1]}

  def logits_fn(tokens, state):
    logits, variables = apply(state["cache"], tokens, None, None, state["position"])
    return logits[:, -1], {"cache": variables["cache"],
                           "position": state["position"] + tokens.shape[1]}

  return prefill_fn, logits_fn, state


def decode_text(model: OmniModel, params: Any, hidden: Array, keys: Array, *, start_id: int,
                eos_id: int, pad_id: int, max_length: int) -> decoding.DecodeOutput:
  """Greedy text from the cross-modal outputs hidden [B, S, D_x] (keys [B, S]: the positions
  the decoder may attend to); the prompt is `start_id` alone ([CLS], as in training), and
  sequences [B, max_length] hold the tokens after it ([SEP] included, then pad_id)."""
  prompt = jnp.full((hidden.shape[0], 1), start_id, jnp.int32)
  prefill_fn, logits_fn, state = _decoder(model, params, "text_decoder_logits", hidden, keys,
                                          prompt, max_length)
  return decoding.greedy(logits_fn, prompt, state, prefill_fn=prefill_fn, max_length=max_length,
                         eos_id=eos_id, pad_id=pad_id)


def sample_codes(model: OmniModel, params: Any, hidden: Array, keys: Array, rng: Array, *,
                 top_k: int = 0, temperature: float = 1.0) -> Array:
  """An image's dVAE codes [B, P] sampled one at a time from the image decoder (top_k 0: all;
  temperature 0: greedy), from its [BOS] code. rng: one key, or one per row [B]."""
  rows, length = hidden.shape[0], model.code_length
  prompt = jnp.full((rows, 1), model.code_vocab, jnp.int32)  # [BOS]
  prefill_fn, logits_fn, state = _decoder(model, params, "image_decoder_logits", hidden, keys,
                                          prompt, length)
  common = dict(prefill_fn=prefill_fn, max_length=length, eos_id=model.code_vocab, pad_id=0)
  if temperature == 0:
    return decoding.greedy(logits_fn, prompt, state, **common).sequences
  return decoding.sample(logits_fn, prompt, state, rng, top_k=top_k, temperature=temperature,
                         **common).sequences
