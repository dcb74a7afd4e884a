"""Captioning (models/blip_generate.py) gives transformers' BlipForConditionalGeneration.generate
token for token: greedy and 3-beam search on the same converted weights and prompt; sampling is
deterministic under a key, and batch-sharded decoding gives what unsharded decoding gives.

The tiny random captioner is made to end captions at varied lengths (a raised [SEP] bias and a
flatter LM head), so EOS handling, min_length and the beam bookkeeping all decide the outputs:
beam search differs from greedy on most rows, and decoding.py's exact beam rules differ from
transformers' on some, which the transformers rules reproduce.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from flava_jax import convert_blip
from flava_jax.models import blip_generate
from tests.models import blip_reference

SEP, BOS = 3, 60
TOKENIZED = np.array([1, 10, 11, 12, SEP])  # "[CLS] a picture of [SEP]" in the tiny vocabulary
BATCH = 8


def _captioner(head_scale, sep_bias, seed=0):
  _, captioning = blip_reference.models(seed=seed)
  with torch.no_grad():
    head = captioning.text_decoder.cls.predictions
    head.transform.LayerNorm.weight.mul_(head_scale)
    head.transform.LayerNorm.bias.mul_(head_scale)
    head.bias[SEP] += sep_bias
  model, params = convert_blip.from_transformers(captioning=captioning)
  return captioning, model, params


def _pixels(seed=0):
  return np.random.default_rng(seed).normal(size=(BATCH, 3, 32, 32)).astype(np.float32)


def _caption(tokens):
  """Token ids up to and including the first [SEP] (transformers pads after it with [SEP] in
  beam search and with [PAD] in greedy search)."""
  tokens = [int(t) for t in tokens]
  return tuple(tokens[:tokens.index(SEP) + 1] if SEP in tokens else tokens)


def _ours(model, params, pixels, settings, rng=None):
  run = jax.jit(functools.partial(blip_generate.captions, model, settings=settings))
  prompt = blip_generate.decoder_prompt(TOKENIZED, BOS)
  out = run(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), prompt, rng=rng)
  assert out.tokens.shape == (BATCH, settings.max_length - prompt.shape[0])
  return [_caption(row) for row in np.asarray(out.tokens)]


def _theirs(captioning, pixels, settings):
  with torch.no_grad():
    out = captioning.generate(
        torch.tensor(pixels), input_ids=torch.tensor(np.tile(TOKENIZED, (BATCH, 1))),
        max_length=settings.max_length, min_length=settings.min_length, do_sample=False,
        num_beams=1 if settings.method == "greedy" else settings.num_beams,
        length_penalty=settings.length_penalty, early_stopping=False)
  prompt_length = len(TOKENIZED) - 1
  assert (out[:, :prompt_length].numpy() == np.r_[BOS, TOKENIZED[1:-1]]).all()
  return [_caption(row[prompt_length:]) for row in out.numpy()]


def test_decoder_prompt():
  np.testing.assert_array_equal(blip_generate.decoder_prompt(TOKENIZED, BOS), [BOS, 10, 11, 12])
  np.testing.assert_array_equal(blip_generate.decoder_prompt(np.tile(TOKENIZED, (2, 1)), BOS),
                                [[BOS, 10, 11, 12]] * 2)


def test_greedy_and_beam_search_give_transformers_tokens():
  """The reference's settings: max_length 20 and min_length 5 with the prompt, 3 beams."""
  captioning, model, params = _captioner(head_scale=0.5, sep_bias=1.5)
  pixels = _pixels()
  greedy = _ours(model, params, pixels, blip_generate.GREEDY)
  assert greedy == _theirs(captioning, pixels, blip_generate.GREEDY)
  beam = _ours(model, params, pixels, blip_generate.BEAM)
  assert beam == _theirs(captioning, pixels, blip_generate.BEAM)

  # A meaningful comparison: captions end at varied lengths (some at max_length), differ across
  # rows, beam search changes most of greedy's, and decoding.py's exact beam rules would give
  # other captions on some rows (transformers' rules are what is matched).
  lengths = {len(c) for c in beam}
  assert len(lengths) >= 3 and 16 in lengths and any(c[-1] == SEP for c in beam), beam
  assert len(set(beam)) >= 5 and sum(b != g for b, g in zip(beam, greedy)) >= 4
  exact = _ours(model, params, pixels, dataclasses.replace(blip_generate.BEAM,
                                                           beam_rules="exact"))
  assert sum(e != b for e, b in zip(exact, beam)) >= 1


def test_min_length_counts_the_prompt():
  """A captioner that wants to stop at once: min_length 9 with a 4-token prompt forbids [SEP]
  until 5 tokens are generated (transformers' MinLengthLogitsProcessor counts the prompt: [SEP]
  may come once prompt + generated tokens reach min_length), so captions end at 6 tokens."""
  captioning, model, params = _captioner(head_scale=0.3, sep_bias=2.0, seed=1)
  pixels = _pixels(1)
  for settings in (dataclasses.replace(blip_generate.GREEDY, max_length=12, min_length=9),
                   dataclasses.replace(blip_generate.BEAM, max_length=12, min_length=9)):
    ours = _ours(model, params, pixels, settings)
    assert ours == _theirs(captioning, pixels, settings), settings.method
    assert all(len(c) >= 6 and SEP not in c[:5] for c in ours), ours
    assert sum(c[-1] == SEP and len(c) == 6 for c in ours) >= 4, ours


def test_sampling_is_deterministic_under_a_key_and_shards_by_batch():
  _, model, params = _captioner(head_scale=0.5, sep_bias=1.5)
  pixels = jnp.asarray(_pixels().transpose(0, 2, 3, 1))
  prompt = blip_generate.decoder_prompt(TOKENIZED, BOS)
  settings = dataclasses.replace(blip_generate.NUCLEUS, top_k=0)  # the nucleus alone
  run = jax.jit(functools.partial(blip_generate.captions, model, settings=settings))
  first = run(params, pixels, prompt, rng=jax.random.key(0))
  again = run(params, pixels, prompt, rng=jax.random.key(0))
  other = run(params, pixels, prompt, rng=jax.random.key(1))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.scores, again.scores)
  assert np.mean(np.asarray(first.tokens) != np.asarray(other.tokens)) > 0.2
  with pytest.raises(ValueError, match="needs rng"):
    blip_generate.captions(model, params, pixels, prompt, settings)
  with pytest.raises(ValueError, match="counts the prompt"):
    blip_generate.captions(model, params, pixels, prompt,
                           dataclasses.replace(settings, max_length=4))

  # The image batch sharded over two devices: the same captions.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  sharded = jax.device_put(pixels, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    on_mesh = run(params, sharded, prompt, rng=jax.random.key(0))
  np.testing.assert_array_equal(on_mesh.tokens, first.tokens)
