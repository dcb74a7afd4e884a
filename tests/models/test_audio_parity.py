"""The audio encoder (models/audio.py) against transformers' Wav2Vec2Model, and its converter:
random-initialised tiny model, padded batch with an attention mask, float32."""

import jax
import numpy as np
import pytest
import torch

from flava_jax import convert_audio
from flava_jax.convert import ConversionError
from flava_jax.models.audio import AudioEncoder
from flava_jax.models.config import ComputeConfig

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            feat_extract_norm="group", do_stable_layer_norm=False, apply_spec_augment=True)


def _random_model(seed, **fields):
  """A random Wav2Vec2Model with non-trivial norms and biases (not their 1 / 0 init)."""
  from transformers import Wav2Vec2Config, Wav2Vec2Model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = Wav2Vec2Model(Wav2Vec2Config(**dict(TINY, **fields))).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name or "original0" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def reference():
  return _random_model(0)


def _batch():
  rng = np.random.default_rng(0)
  wave = rng.normal(size=(3, 900)).astype(np.float32)
  mask = np.ones((3, 900), np.int32)
  mask[1, 610:] = 0
  mask[2, 333:] = 0
  return (wave * mask).astype(np.float32), mask


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_hidden_states_and_features_match_transformers(norm):
  ref = _random_model(1, feat_extract_norm=norm)
  config, params = convert_audio.from_transformers(ref)
  wave, mask = _batch()
  out = jax.jit(lambda p, w, m: AudioEncoder(config, ComputeConfig()).apply({"params": p}, w, m))(
      params, wave, mask)
  with torch.no_grad():
    r = ref(torch.from_numpy(wave), attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True)
  assert len(r.hidden_states) == config.num_layers + 1
  for i, layer in enumerate(r.hidden_states):  # the encoder's input, then every layer's output
    np.testing.assert_allclose(np.asarray(out["layers"][i]), layer.numpy(), rtol=1e-5,
                               atol=1e-5, err_msg=f"layer {i}")
  frames = np.asarray(out["frame_mask"])
  assert frames.sum(1).tolist() == [int(config.frames(n)) for n in mask.sum(1)]
  np.testing.assert_allclose(np.asarray(out["hidden"]), r.last_hidden_state.numpy(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["features"]), r.extract_features.numpy(),
                             rtol=1e-5, atol=1e-5)


def test_round_trip_is_bit_exact_and_weights_are_accounted_for(reference, tmp_path):
  config, params = convert_audio.from_transformers(reference)
  path = convert_audio.to_transformers(config, params, str(tmp_path / "hf"))
  from transformers import Wav2Vec2Model  # pylint: disable=import-outside-toplevel
  loaded = Wav2Vec2Model.from_pretrained(path).eval()
  for name, value in reference.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  again_config, again = convert_audio.from_transformers(path)
  assert again_config == config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  import flava_jax.transformers_io as io  # pylint: disable=import-outside-toplevel
  missing = dict(state)
  del missing["encoder.layers.1.feed_forward.output_dense.bias"]
  io.write_directory(str(tmp_path / "missing"), reference.config, missing)
  with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.feed_forward\.output_dense\.bias"):
    convert_audio.from_transformers(str(tmp_path / "missing"))
  extra = dict(state, **{"encoder.extra.weight": np.zeros(3, np.float32)})
  io.write_directory(str(tmp_path / "extra"), reference.config, extra)
  with pytest.raises(ConversionError, match=r"no place in our model: encoder\.extra\.weight"):
    convert_audio.from_transformers(str(tmp_path / "extra"))


def test_base_size_matches_transformers():
  """wav2vec2-base's sizes (12 x 768, 7 convs of 512, positional conv 128 / 16 groups), random
  weights, half a second of padded audio: every layer within 1e-4."""
  from transformers import Wav2Vec2Config, Wav2Vec2Model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(2)
  ref = Wav2Vec2Model(Wav2Vec2Config()).eval()  # the defaults are wav2vec2-base's
  config, params = convert_audio.from_transformers(ref)
  assert (config.hidden_size, config.num_layers, config.conv_dim) == (768, 12, (512,) * 7)
  rng = np.random.default_rng(3)
  mask = np.ones((2, 8000), np.int32)
  mask[1, 5000:] = 0
  wave = (rng.normal(size=(2, 8000)) * mask).astype(np.float32)
  out = jax.jit(lambda p, w, m: AudioEncoder(config, ComputeConfig()).apply({"params": p}, w, m))(
      params, wave, mask)
  with torch.no_grad():
    r = ref(torch.from_numpy(wave), attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True)
  assert np.asarray(out["frame_mask"]).sum(1).tolist() == [24, 15]  # 20 ms frames
  for i, layer in enumerate(r.hidden_states):
    np.testing.assert_allclose(np.asarray(out["layers"][i]), layer.numpy(), rtol=1e-4,
                               atol=1e-4, err_msg=f"layer {i}")
