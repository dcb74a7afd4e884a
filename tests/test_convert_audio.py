"""The convert command line with audio models: a transformers Wav2Vec2Model directory -> an audio
model directory -> a Wav2Vec2Model directory again (bit-exact), the model directory as a warm
start of an audio task's tower, a trained audio_text workdir (ending in audio retrieval on the
held-out spoken captions) exporting its audio tower, clear errors."""

import jax
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from configs import audio_text as audio_configs
from flava_jax import checkpoint, convert, convert_audio, evaluate, experiment, trainer, warm_start
from flava_jax.models.audio import AudioConfig

TINY = AudioConfig(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, conv_dim=(8,) * 7,
                   conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                   num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_wav2vec2_to_a_model_directory_and_back_is_bit_exact(tmp_path):
  torch.manual_seed(0)
  hf = Wav2Vec2Model(convert_audio.config_to_transformers(TINY)).eval()
  hf.save_pretrained(str(tmp_path / "hf"))
  said = convert.run_command(from_hf=str(tmp_path / "hf"), out=str(tmp_path / "model"))
  assert said.startswith(f"wrote {tmp_path / 'model'}: audio encoder with ")
  loaded = checkpoint.load_model(str(tmp_path / "model"))
  assert loaded.task == "audio" and loaded.model.config == TINY
  said = convert.run_command(to_hf=str(tmp_path / "model"), out=str(tmp_path / "back"))
  assert "Wav2Vec2Model.from_pretrained" in said
  back = _state(Wav2Vec2Model.from_pretrained(str(tmp_path / "back")))
  original = _state(hf)
  assert back.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  # the model directory is an audio warm start; it has no evaluators of its own
  params = warm_start.read_flava_params(str(tmp_path / "model"), "init.audio_from")
  assert set(params) == {"audio_encoder"}
  with pytest.raises(ValueError, match="audio encoder alone.*init.audio_from"):
    evaluate.load_checkpoint(str(tmp_path / "model"))


def test_an_audio_text_workdir_exports_its_audio_tower(tmp_path):
  config = audio_configs.get_config("tiny")
  config.update(dict(global_batch=8, total_steps=1, audio_samples=6400))
  config.evals.audio_retrieval.update(dict(limit=24, batch_size=8))
  metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  # the audio retrieval evaluator at the end, on the held-out spoken captions
  assert metrics["eval/audio_retrieval/recordings"] == 24
  assert metrics["eval/audio_retrieval/chance_r1"] == pytest.approx(1 / 24)
  assert 0 <= metrics["eval/audio_retrieval/a2t_r1"] <= metrics["eval/audio_retrieval/a2t_r5"]
  said = convert.run_command(to_hf=str(tmp_path / "run"), out=str(tmp_path / "hf"))
  assert "exported step 1" in said and "Wav2Vec2Model.from_pretrained" in said
  _, params = convert_audio.from_transformers(str(tmp_path / "hf"))
  trained = warm_start.read_workdir_params(str(tmp_path / "run"), "run")["audio_encoder"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  task = experiment.Experiment(config, jax.devices()[:1]).task
  assert task.audio_config == AudioConfig.from_dict(dict(config.audio))
