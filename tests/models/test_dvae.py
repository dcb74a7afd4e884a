"""The dVAE tokenizer: codes identical to transformers' FlavaImageCodebook; decoder shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

import flava_jax
from conftest import randomize_


def _codes_match(hf_codebook, dvae, params, size, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.uniform(size=(batch, 3, size, size)).astype(np.float32)
  mapped = 0.8 * pixels + 0.1
  with torch.no_grad():
    ref_logits = hf_codebook(torch.tensor(mapped)).numpy()  # [B, V, h, w]
    ref_codes = hf_codebook.get_codebook_indices(torch.tensor(mapped)).numpy()  # [B, h, w]
  nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  logits = dvae.apply({"params": params}, flava_jax.map_pixels(nhwc), method="logits")
  codes = dvae.apply({"params": params}, flava_jax.map_pixels(nhwc), method="tokens")
  np.testing.assert_allclose(np.asarray(logits), ref_logits.transpose(0, 2, 3, 1),
                             atol=1e-4, rtol=1e-4)
  assert codes.dtype == jnp.int32 and codes.shape == (batch, (size // 8) ** 2)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes.reshape(batch, -1))


def test_tiny_codebook_from_directory(tmp_path):
  torch.manual_seed(0)
  hf = randomize_(FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=8, vocab_size=64)).eval())
  hf.save_pretrained(tmp_path)
  dvae, params = flava_jax.dvae_from_transformers(str(tmp_path))
  assert not dvae.config.decoder and dvae.config.vocab_size == 64
  _codes_match(hf, dvae, params, size=32)
  with pytest.raises(ValueError, match="without a decoder"):
    dvae.apply({"params": params}, jnp.zeros((1, 4, 4, 64)), method="decode")


def test_full_codebook_codes_identical():
  """DALL-E sizes (hidden 256, 8192 codes) on 112 px images -> 14x14 codes, as FLAVA uses it."""
  torch.manual_seed(0)
  hf = randomize_(FlavaImageCodebook(FlavaImageCodebookConfig()).eval(), seed=3)
  dvae, params = flava_jax.dvae_from_transformers(hf)
  assert dvae.config.hidden_size == 256 and dvae.config.vocab_size == 8192
  _codes_match(hf, dvae, params, size=112)


def test_codebook_inside_pretraining_checkpoint(tiny_hf_pretraining, tiny_hf_dir):
  dvae, params = flava_jax.dvae_from_transformers(tiny_hf_dir)
  assert dvae.config.blocks_per_group == 1
  _codes_match(tiny_hf_pretraining.image_codebook, dvae, params, size=16)


def test_decoder_reconstructs_to_pixel_range():
  config = flava_jax.DVAEConfig(hidden_size=16, blocks_per_group=1, vocab_size=32,
                                decoder_init_size=8)
  dvae = flava_jax.DVAE(config)
  params = flava_jax.init_dvae_params(dvae, jax.random.key(0), image_size=32)
  assert set(params) == {"encoder", "decoder"}
  pixels = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  tokens = jax.jit(lambda p, x: dvae.apply({"params": p}, x, method="tokens"))(
      params, flava_jax.map_pixels(pixels))
  assert tokens.shape == (2, 16) and int(tokens.max()) < 32
  stats = dvae.apply({"params": params}, jax.nn.one_hot(tokens.reshape(2, 4, 4), 32),
                     method="decode")
  assert stats.shape == (2, 32, 32, 6)
  image = jax.jit(lambda p, t: dvae.apply({"params": p}, t, (4, 4), method="reconstruct"))(
      params, tokens)
  assert image.shape == (2, 32, 32, 3)
  assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
  # The decoder block's residual kernels are (1, 3, 3, 3) wide, the encoder's (3, 3, 3, 1).
  block = params["decoder"]["group_1_block_1"]
  assert block["res_conv_1"]["kernel"].shape[:2] == (1, 1)
  assert block["res_conv_4"]["kernel"].shape[:2] == (3, 3)
  assert params["encoder"]["group_1_block_1"]["res_conv_4"]["kernel"].shape[:2] == (1, 1)


def test_pixel_mapping_round_trips():
  x = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(flava_jax.map_pixels(x), 0.8 * x + 0.1, atol=1e-7)
  np.testing.assert_allclose(flava_jax.unmap_pixels(flava_jax.map_pixels(x)), x, atol=1e-6)
