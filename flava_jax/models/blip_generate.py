"""Captions from images with BLIP's decoder: greedy, beam search and nucleus sampling.

    prompt = decoder_prompt(tokenizer("a picture of "), bos_id)  # [DEC] a picture of
    out = captions(model, params, pixels, prompt, BEAM)          # out.tokens [B, max_new]
    out = captions(model, params, pixels, prompt, NUCLEUS, rng=jax.random.key(0))

The decoding algorithms are models/decoding.py's; this file adapts the MED to their protocol
through Blip.init_cache / decode_step: the prefill feeds the prompt with the image tokens, whose
cross-attention keys/values every layer projects once and caches, and each step feeds one token
at the next position. Everything is jittable with static settings (CaptionSettings is hashable),
has no Python loop over rows, and keeps the batch axis leading (beam search folds beams into it),
so a batch-sharded image batch stays sharded.

Lengths count the prompt, as the reference (salesforce/BLIP, on transformers' generate) and
transformers' BlipForConditionalGeneration.generate count them: max_length is the prompt plus
the generated tokens, and EOS ([SEP]) is forbidden while the prompt plus the generated tokens are
fewer than min_length. decoding.py counts generated tokens only; `captions` converts.

Presets follow the reference's captioning: BEAM (3 beams, max 20, min 5, repetition penalty 1.0,
length penalty 1.0) and NUCLEUS (the CapFilt captioner: top-p 0.9, repetition penalty 1.1, and
top-k 50, transformers' default that the reference's sampling call leaves in place). Beam search
follows transformers 5.x (decoding.beam_search rules="transformers": early_stopping=False's
heuristic, only a step's best num_beams candidates may finish, scores divided by the generated
length with [SEP]), which the tests match token for token. The reference ran transformers 4.15,
whose beam scorer divided by the whole length (prompt included, [SEP] excluded) and stopped by
that length too: with a 4-token prompt its rankings can differ from these on close calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flava_jax.models import decoding, transformer
from flava_jax.models.blip import Blip

Array = jax.Array
METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
  """How to decode. max_length / min_length count the prompt's tokens too (see the module
  docstring); top_k, top_p and temperature apply to sampling, num_beams, length_penalty and
  beam_rules to beam search (decoding.beam_search's alpha and rules)."""

  method: str = "beam"
  max_length: int = 20
  min_length: int = 5
  num_beams: int = 3
  length_penalty: float = 1.0
  beam_rules: str = "transformers"
  repetition_penalty: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  temperature: float = 1.0

  def validate(self, prompt_length: int) -> "CaptionSettings":
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is not one of {METHODS}")
    if self.max_length <= prompt_length:
      raise ValueError(f"max_length={self.max_length} counts the prompt's {prompt_length} tokens "
                       "too and leaves none to generate")
    if self.method == "beam" and self.num_beams < 1:
      raise ValueError(f"num_beams must be positive, got {self.num_beams}")
    return self


BEAM = CaptionSettings()
GREEDY = CaptionSettings(method="greedy")
NUCLEUS = CaptionSettings(method="sample", top_p=0.9, top_k=50, repetition_penalty=1.1)


@flax.struct.dataclass
class Captions:
  """tokens [B, max_length - P]: the generated tokens after the prompt, [SEP] included, padded
  with the pad id after it; scores [B]: their summed log-probabilities (beam search: divided by
  the length penalty)."""

  tokens: Array
  scores: Array


def decoder_prompt(tokenized: Array, bos_id: int) -> Array:
  """A tokenised prompt ([CLS] ... [SEP], unpadded, [P + 1] or [B, P + 1]) -> the decoder's
  prompt: [DEC] at position 0 and no trailing [SEP] (what the reference and transformers feed)."""
  tokenized = jnp.asarray(tokenized, jnp.int32)
  return tokenized.at[..., 0].set(bos_id)[..., :-1]


def captions(model: Blip, params: Any, pixels: Array, prompt: Array,
             settings: CaptionSettings = BEAM, rng: Array | None = None) -> Captions:
  """Captions of normalised NHWC `pixels` [B, H, W, C] continuing `prompt` ([P] for every image
  or [B, P]; from `decoder_prompt`). rng: the key of sampling (deterministic under it), or one
  key per image [B] (each caption then depends on its image and key only)."""
  cfg = model.config.text
  batch = pixels.shape[0]
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim == 1:
    prompt = jnp.broadcast_to(prompt[None], (batch, prompt.shape[0]))
  prompt_length = prompt.shape[1]
  settings.validate(prompt_length)
  new_tokens = settings.max_length - prompt_length
  common = dict(max_length=new_tokens, eos_id=cfg.sep_token_id, pad_id=cfg.pad_token_id,
                min_length=max(0, settings.min_length - prompt_length))

  image = model.image_embeds(params, pixels)  # [B, 1+P_img, D_v]
  # The last generated token is never fed back: the cache holds P + new_tokens - 1 positions.
  cache = model.init_cache(params, batch, prompt_length + new_tokens - 1, image.shape[1])
  state = {"cache": cache, "position": jnp.zeros((), jnp.int32)}

  def prefill_fn(tokens: Array, state: Any) -> tuple[Array, Any]:
    logits, cache = model.decode_step(params, state["cache"], tokens, None, image, None,
                                      state["position"])
    return logits[:, -1], {"cache": cache, "position": state["position"] + tokens.shape[1]}

  def logits_fn(tokens: Array, state: Any) -> tuple[Array, Any]:
    logits, cache = model.decode_step(params, state["cache"], tokens, None, None, None,
                                      state["position"])
    return logits[:, -1], {"cache": cache, "position": state["position"] + tokens.shape[1]}

  if settings.method == "greedy":
    out = decoding.greedy(logits_fn, prompt, state, prefill_fn=prefill_fn,
                          repetition_penalty=settings.repetition_penalty, **common)
  elif settings.method == "sample":
    if rng is None:
      raise ValueError("method='sample' needs rng")
    out = decoding.sample(logits_fn, prompt, state, rng, prefill_fn=prefill_fn,
                          temperature=settings.temperature, top_k=settings.top_k,
                          top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                          **common)
  else:
    if settings.repetition_penalty != 1.0:
      raise ValueError("beam search here has no repetition penalty (the reference's beam "
                       "captioning uses 1.0)")
    axes = {"cache": transformer.cache_batch_axes(cache), "position": None}
    out = decoding.beam_search(logits_fn, prompt, state, prefill_fn=prefill_fn,
                               beam_size=settings.num_beams, alpha=settings.length_penalty,
                               rules=settings.beam_rules, state_batch_axes=axes, **common)
  return Captions(tokens=out.sequences, scores=out.scores)
