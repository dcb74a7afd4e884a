"""The shared layers as a decoder: causal masks, cross-attention, post-LN and the key/value cache.

A tiny causal LM (tests/models/tiny_lm.py) decoded one token at a time through the cache gives the
logits of the full forward pass; future tokens and padded encoder positions change nothing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flava_jax.models import transformer
from flava_jax.models.config import ComputeConfig, EncoderConfig, FlavaConfig
from tests.models import tiny_lm

BATCH, LENGTH = 2, 7


def _tokens(seed=0, batch=BATCH, length=LENGTH):
  return jnp.asarray(np.random.default_rng(seed).integers(0, tiny_lm.VOCAB, (batch, length)),
                     jnp.int32)


@pytest.mark.parametrize("cross, norm_first, remat, padded", [
    (False, True, "none", False),
    (True, True, "none", True),
    (True, False, "full", False),
], ids=["causal_lm", "cross_attention_padded", "post_ln_cross_remat"])
def test_cached_decoding_matches_the_full_forward(cross, norm_first, remat, padded):
  model = tiny_lm.make_model(cross, norm_first, remat, unroll=1 if remat == "none" else 2)
  tokens = _tokens()
  encoder = tiny_lm.encoder_inputs(BATCH) if cross else (None, None)
  # Row 1 has 5 real tokens and 2 padding positions at the end (keys nothing real attends to).
  mask = jnp.asarray(np.arange(LENGTH)[None] < np.array([[LENGTH], [5]])) if padded else None
  params = tiny_lm.init_params(model, BATCH, LENGTH, encoder if cross else None)
  full = jax.jit(lambda p: model.apply({"params": p}, tokens, mask, *encoder))(params)

  @jax.jit
  def step(cache, tokens, mask, encoder_hidden, encoder_mask):
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, mask,
                                    encoder_hidden, encoder_mask, decode=True, mutable=["cache"])
    return logits, variables["cache"]

  cache = tiny_lm.empty_cache(model, BATCH, LENGTH, encoder if cross else None)
  # A two-token prefill (with the encoder sequence), then one token at a time (without it).
  chunks = [(0, 2)] + [(t, t + 1) for t in range(2, LENGTH)]
  pieces = []
  for i, (start, stop) in enumerate(chunks):
    chunk_mask = None if mask is None else mask[:, start:stop]
    logits, cache = step(cache, tokens[:, start:stop], chunk_mask,
                         *(encoder if i == 0 else (None, None)))
    pieces.append(logits)
  incremental = jnp.concatenate(pieces, axis=1)
  real = np.ones((BATCH, LENGTH), bool) if mask is None else np.asarray(mask)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5)
  index = cache["decoder"]["layers"]["attention"]["cache_index"]
  np.testing.assert_array_equal(index, [LENGTH] * 2)  # one per layer, at index i of the stack
  assert cache["decoder"]["layers"]["attention"]["cached_key"].shape == (2, BATCH, LENGTH, 2, 8)


def test_future_tokens_do_not_change_earlier_positions():
  model = tiny_lm.make_model(cross_attention=True)
  encoder = tiny_lm.encoder_inputs(BATCH)
  params = tiny_lm.init_params(model, BATCH, LENGTH, encoder)
  apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens, None, *encoder))
  tokens = _tokens()
  changed = tokens.at[:, 4:].set((tokens[:, 4:] + 3) % tiny_lm.VOCAB)
  before, after = apply(tokens), apply(changed)
  np.testing.assert_allclose(after[:, :4], before[:, :4], atol=1e-6)
  assert np.abs(np.asarray(after[:, 4:] - before[:, 4:])).max() > 1e-3


def test_padded_encoder_positions_do_not_change_cross_attention():
  model = tiny_lm.make_model(cross_attention=True, norm_first=False)
  hidden, mask = tiny_lm.encoder_inputs(BATCH)  # row 1: the last encoder position is padding
  params = tiny_lm.init_params(model, BATCH, LENGTH, (hidden, mask))
  apply = jax.jit(lambda h, m: model.apply({"params": params}, _tokens(), None, h, m))
  before = apply(hidden, mask)
  noise = jnp.where(mask[..., None], 0.0, 100.0)
  np.testing.assert_allclose(apply(hidden + noise, mask), before, atol=1e-6)
  changed = apply(hidden.at[:, 0].add(1.0), mask)  # a real position does matter
  assert np.abs(np.asarray(changed - before)).max() > 1e-3


def test_parameter_names_of_decoder_blocks():
  model = tiny_lm.make_model(cross_attention=True)
  encoder = tiny_lm.encoder_inputs(BATCH)
  tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, None, *encoder)["params"])
  layers = boxed["decoder"]["layers"]
  assert sorted(layers) == ["attention", "cross_attention", "mlp", "norm_attn", "norm_cross",
                            "norm_mlp"]
  assert sorted(layers["attention"]) == ["out_bias", "out_kernel", "qkv_bias", "qkv_kernel"]
  cross = layers["cross_attention"]
  shapes = {name: (leaf.value.shape, leaf.names) for name, leaf in cross.items()}
  assert shapes == {
      "q_kernel": ((2, 16, 2, 8), ("layers", "embed", "heads", "head_dim")),
      "q_bias": ((2, 2, 8), ("layers", "heads", "head_dim")),
      "kv_kernel": ((2, tiny_lm.ENCODER_WIDTH, 2, 2, 8),
                    ("layers", "embed", "qkv", "heads", "head_dim")),
      "kv_bias": ((2, 2, 2, 8), ("layers", "qkv", "heads", "head_dim")),
      "out_kernel": ((2, 2, 8, 16), ("layers", "heads", "head_dim", "embed")),
      "out_bias": ((2, 16), ("layers", "embed")),
  }
  # Without the option a block has exactly FLAVA's parameters.
  plain = jax.eval_shape(lambda: tiny_lm.make_model().init(jax.random.key(0), tokens)["params"])
  assert sorted(plain["decoder"]["layers"]) == ["attention", "mlp", "norm_attn", "norm_mlp"]


def test_post_ln_is_bert_order():
  """norm_first=False computes LN(x + Attn(x)), then LN(. + MLP(.)): checked against a manual
  composition of the block's own sublayers."""
  config, compute = EncoderConfig(16, 1, 2, 32, 1e-6), ComputeConfig(initializer_range=0.3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)), jnp.float32)
  block = transformer.TransformerBlock(config, compute, norm_first=False)
  p = tiny_lm.random_params(jax.eval_shape(block.init, jax.random.key(0), x, None)["params"])
  got, _ = jax.jit(block.apply)({"params": p}, x, None)

  @jax.jit
  def manual(p, x):
    norm = transformer.LayerNorm(1e-6)
    attention = transformer.SelfAttention(config, compute).apply({"params": p["attention"]}, x,
                                                                 None)
    h = norm.apply({"params": p["norm_attn"]}, x + attention)
    mlp = transformer.MLP(config, compute).apply({"params": p["mlp"]}, h)
    return norm.apply({"params": p["norm_mlp"]}, h + mlp)

  np.testing.assert_allclose(got, manual(p, x), atol=1e-6)


def test_causal_attention_kernel_paths():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4]]))
  got = transformer.attention_kernel(q, k, v, mask, "xla", causal=True)
  # Reference: softmax over keys j <= t that are real.
  logits = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
  allowed = np.tril(np.ones((6, 6), bool))[None, None] & np.asarray(mask)[:, None, None, :]
  probs = np.exp(np.where(allowed, logits, -np.inf) - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", probs, v), atol=1e-5)
  np.testing.assert_array_equal(transformer.attention_kernel(q, k, v, mask, "auto", causal=True),
                                got)
  with pytest.raises(NotImplementedError, match="splash"):
    transformer.attention_kernel(q, k, v, mask, "splash", causal=True)


def test_splash_refuses_cross_attention():
  config = EncoderConfig(16, 1, 2, 32)
  cross = transformer.CrossAttention(config, ComputeConfig(attention_impl="splash"))
  x, enc = jnp.zeros((1, 3, 16)), jnp.zeros((1, 4, 12))
  with pytest.raises(NotImplementedError, match="splash"):
    cross.init(jax.random.key(0), x, enc, None)


def test_compute_config_from_flava_config():
  flava = FlavaConfig(dtype="bfloat16", attention_impl="auto", remat_policy="dots",
                      scan_unroll=3, initializer_range=0.05)
  assert flava.compute == ComputeConfig("bfloat16", "float32", "auto", "dots", 3, 0.05)
  assert ComputeConfig().validate("x") == ComputeConfig()
  with pytest.raises(ValueError, match=r"blip\.attention_impl"):
    ComputeConfig(attention_impl="flash").validate("blip")
  with pytest.raises(ValueError, match=r"blip\.scan_unroll"):
    ComputeConfig(scan_unroll=0).validate("blip")


def test_cache_batch_axes():
  model = tiny_lm.make_model(cross_attention=True)
  cache = tiny_lm.empty_cache(model, BATCH, LENGTH, tiny_lm.encoder_inputs(BATCH))
  axes = transformer.cache_batch_axes(cache)
  layers = axes["decoder"]["layers"]
  assert layers["attention"] == dict(cached_key=1, cached_value=1, cached_mask=1, cache_index=None)
  assert layers["cross_attention"] == dict(cached_key=1, cached_value=1, cached_mask=1)
  assert axes["position"] is None
  assert cache["decoder"]["layers"]["cross_attention"]["cached_key"].shape == (2, BATCH, 5, 2, 8)


def test_decoder_under_a_mesh_and_rules():
  """Sanity: the constraints of decoder blocks resolve under FLAVA-style rules and a mesh."""
  model = tiny_lm.make_model(cross_attention=True)
  encoder = tiny_lm.encoder_inputs(4)
  params = tiny_lm.init_params(model, 4, LENGTH, encoder)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  rules = [("batch", "data")]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda t: model.apply({"params": params}, t, None, *encoder))(_tokens(batch=4))
  want = jax.jit(lambda t: model.apply({"params": params}, t, None, *encoder))(_tokens(batch=4))
  np.testing.assert_allclose(out, want, atol=1e-5)
