"""Image decoding and FLAVA's two views of one crop."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flava_jax
from flava_jax.data import transforms as T
from flava_jax.tasks import flava as flava_task
from tests.trees import assert_trees_equal, matched_leaves

CFG = T.ImageTransformConfig(image_size=32, dvae_size=16)


def _encode(image, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_mode_decodes_to_rgb(mode):
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8))
  if mode == "I;16":
    image = Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16))
  else:
    image = rgb.convert(mode)
  fmt = "JPEG" if mode == "CMYK" else "PNG"
  decoded = T.decode_rgb(_encode(image, fmt), CFG.max_pixels)
  assert decoded.mode == "RGB" and decoded.size == (30, 20)
  if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
    assert np.asarray(decoded).max() > 200


def test_transparent_pixels_become_white():
  image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
  decoded = np.asarray(T.decode_rgb(_encode(image), CFG.max_pixels))
  assert (decoded == 255).all()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_image"),
    (b"not an image at all", "undecodable"),
])
def test_bad_bytes_name_their_reason(data, reason):
  with pytest.raises(T.BadImage) as err:
    T.decode_rgb(data, CFG.max_pixels)
  assert err.value.reason == reason


def test_truncated_and_oversized_images_are_refused():
  jpeg = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
  with pytest.raises(T.BadImage) as err:
    T.decode_rgb(jpeg[: len(jpeg) // 2], CFG.max_pixels)
  assert err.value.reason == "truncated_image"
  with pytest.raises(T.BadImage) as err:
    T.decode_rgb(jpeg, max_pixels=1000)
  assert err.value.reason == "too_large"


def test_crop_boxes_respect_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(500):
    left, top, w, h = T.random_resized_crop_box(400, 300, rng, (0.9, 1.0), (3 / 4, 4 / 3))
    assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    assert 0.85 <= w * h / (400 * 300) <= 1.0
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  # An extreme panorama falls back to a centre crop of the allowed ratio.
  left, top, w, h = T.random_resized_crop_box(1000, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3))
  assert h == 10 and w == 13 and left == (1000 - 13) // 2


def test_two_views_of_the_same_crop():
  rng = np.random.default_rng(1)
  gradient = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 1, 3))
  image = Image.fromarray(gradient.astype(np.uint8))
  encoder, dvae = T.train_views(image, np.random.default_rng(3), CFG)
  assert encoder.shape == (32, 32, 3) and dvae.shape == (16, 16, 3)
  assert encoder.dtype == dvae.dtype == np.uint8
  encoder, dvae = T.encoder_pixels(encoder), flava_jax.map_pixels(dvae.astype(np.float32) / 255.0)
  assert encoder.dtype == dvae.dtype == np.float32
  assert 0.1 - 1e-6 <= dvae.min() and dvae.max() <= 0.9 + 1e-6  # x -> 0.8 x + 0.1
  # Same crop: de-normalised encoder pixels and unmapped dVAE pixels agree after downsampling.
  enc_pixels = encoder * T.CLIP_STD + T.CLIP_MEAN
  dvae_pixels = (dvae - 0.1) / 0.8
  enc_small = enc_pixels.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
  assert np.abs(enc_small - dvae_pixels).mean() < 0.02
  # Deterministic in the rng, no flip by default (left is darker than right).
  again, _ = T.train_views(image, np.random.default_rng(3), CFG)
  np.testing.assert_array_equal(encoder, T.encoder_pixels(again))
  assert enc_pixels[:, :4].mean() < enc_pixels[:, -4:].mean()
  del rng


def test_eval_views_resize_the_whole_image():
  image = Image.new("RGB", (50, 20), (255, 255, 255))
  encoder, dvae = T.eval_views(image, CFG)
  encoder, dvae = T.encoder_pixels(encoder), flava_jax.map_pixels(dvae.astype(np.float32) / 255.0)
  np.testing.assert_allclose(encoder, np.broadcast_to((1 - T.CLIP_MEAN) / T.CLIP_STD, (32, 32, 3)),
                             atol=1e-5)
  np.testing.assert_allclose(dvae, 0.9, atol=1e-6)


def _photo(width=640, height=480, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
  return _encode(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), "JPEG")


def test_views_from_bytes_match_the_decoded_path_and_fast_decode_stays_close():
  cfg = T.ImageTransformConfig(image_size=224, dvae_size=112)
  data = _photo()
  exact = T.train_views_from_bytes(data, np.random.default_rng(4), cfg)
  reference = T.train_views(T.decode_rgb(data, cfg.max_pixels), np.random.default_rng(4), cfg)
  assert_trees_equal(exact, reference)
  fast_cfg = dataclasses.replace(cfg, fast_decode=True)
  fast = T.train_views_from_bytes(data, np.random.default_rng(4), fast_cfg)
  for _, a, b in matched_leaves(fast, exact):
    assert a.shape == b.shape and a.dtype == np.uint8
    diff = np.abs(a.astype(float) - b)
    assert 0 < diff.mean() < 3.0  # DCT-domain 1/2 scale decode: close, not equal
  # Small images are never drafted: identical to the exact path.
  small = _photo(300, 240)
  np.testing.assert_array_equal(T.train_views_from_bytes(small, np.random.default_rng(1), fast_cfg)[0],
                                T.train_views_from_bytes(small, np.random.default_rng(1), cfg)[0])


def test_model_pixels_finish_uint8_views_on_the_device():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  batch = {"pixels": jnp.asarray(rgb), "dvae_pixels": jnp.asarray(rgb), "patch_mask": None}
  out = jax.jit(lambda b: flava_task.model_pixels(b))({k: v for k, v in batch.items() if v is not None})
  np.testing.assert_allclose(np.asarray(out["pixels"]),
                             (rgb / 255.0 - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["dvae_pixels"]), 0.8 * rgb / 255.0 + 0.1, atol=1e-6)
  floats = {"pixels": np.zeros((1, 4, 4, 3), np.float32)}
  assert flava_task.model_pixels(floats)["pixels"] is floats["pixels"]  # float inputs pass unchanged
