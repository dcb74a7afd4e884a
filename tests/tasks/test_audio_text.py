"""The audio-text contrastive task (tasks/audio_text.py, configs/audio_text.py): the loss and gradients on
meshes (8,1,1), (4,2,1) and (2,2,2) equal one device's (loss, metrics, every gradient), the step's
arrays and FLOPs, start-up checks, the audio tower's warm start from a Wav2Vec2Model (a run that
ends with audio retrieval: tests/test_convert_audio.py)."""

import jax
import numpy as np
import pytest

from configs import audio_text as audio_configs
from flava_jax import experiment
from tests import meshes
from tests.trees import assert_metrics_close, assert_trees_close

BATCH = 16
SAMPLES = 6400  # 0.4 s: ten frames of the tiny encoder


def tiny_experiment(sizes, devices=None):
  config = audio_configs.get_config("tiny")
  config.global_batch = BATCH
  config.audio_samples = SAMPLES
  config.sharding.mesh = sizes
  config.optimizer.warmup_steps = 0
  config.optimizer.eps = 1e-3  # see tests/test_sharded_step.py: Adam's first step near zero
  return experiment.Experiment(config, devices)


def test_the_loss_and_gradients_match_one_device_on_meshes():
  exp1 = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  initial = jax.device_get(exp1.create_state(jax.random.key(0)))
  batch = exp1.task.random_batch("audio", BATCH, seed=1)
  assert batch["audio_mask"].sum(1).min() < SAMPLES  # padded rows

  def loss_and_grads(exp):
    return meshes.loss_and_grads(exp, "audio", initial, None, batch, BATCH // exp.data_parallel,
                                 jax.random.key(3))

  ref_metrics, ref_grads = loss_and_grads(exp1)
  assert abs(float(ref_metrics["contrastive"]) - np.log(BATCH)) < 0.5  # near chance at init
  untouched = [g for g in ref_grads if not any(np.abs(x).max() > 0
                                                for x in jax.tree.leaves(ref_grads[g]))]
  assert not untouched, untouched  # every part of the model has a gradient
  for sizes in (dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
                dict(data=2, fsdp=2, tensor=2)):  # the last caught a grouped-conv gradient bug
    metrics, grads = loss_and_grads(tiny_experiment(sizes))
    assert_metrics_close(metrics, ref_metrics, sizes)
    assert_trees_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def test_the_step_reads_fixed_length_audio_and_counts_its_flops():
  task = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]).task
  spec = task.batch_spec("audio", 4)
  assert spec["audio"].shape == spec["audio_mask"].shape == (4, SAMPLES)
  assert spec["audio"].dtype == np.float32 and spec["input_ids"].shape == (4, 32)
  assert task.step_kinds(["trimodal", "audio"]) == ("audio",)
  assert task.audio_config.frames(SAMPLES) == 9
  assert task.step_flops("audio", 8) == pytest.approx(2 * task.step_flops("audio", 4), rel=0.01)
  assert task.audio_encoder_flops() > 0


def test_start_up_errors_name_the_field():
  config = audio_configs.get_config("tiny")
  config.audio_samples = 300
  with pytest.raises(ValueError, match="audio_samples=300"):
    experiment.Experiment(config)
  config = audio_configs.get_config("tiny")
  config.audio.feat_extract_norm = "batch"
  with pytest.raises(ValueError, match="feat_extract_norm"):
    experiment.Experiment(config)
  with pytest.raises(ValueError, match="tiny or base"):
    audio_configs.get_config("huge")


def test_the_audio_tower_warm_starts_from_a_transformers_wav2vec2_directory(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Wav2Vec2Model  # pylint: disable=import-outside-toplevel

  from flava_jax import convert_audio, warm_start  # pylint: disable=import-outside-toplevel
  config = audio_configs.get_config("tiny")
  config.audio_samples = SAMPLES
  task = experiment.Experiment(config, jax.devices()[:1]).task
  torch.manual_seed(0)
  hf = Wav2Vec2Model(convert_audio.config_to_transformers(task.audio_config)).eval()
  hf.save_pretrained(str(tmp_path / "w2v"))
  params = jax.device_get(task.init_params(jax.random.key(0)))
  loaded, notes = warm_start.initial_params(params, {"audio_from": str(tmp_path / "w2v")},
                                            task.WARM_STARTS)
  _, want = convert_audio.from_transformers(str(tmp_path / "w2v"))
  assert_trees_close(jax.device_get(loaded["audio_encoder"]), want, atol=0, rtol=0)
  assert_trees_close(jax.device_get(loaded["text_encoder"]), params["text_encoder"], atol=0,
                     rtol=0)
  assert notes and "audio_encoder" in notes[0]
  config.audio.conv_dim = (8,) * 7  # another shape: refused, naming the field and the weight
  other = experiment.Experiment(config, jax.devices()[:1]).task
  with pytest.raises(ValueError, match="init.audio_from.*conv0_kernel"):
    warm_start.initial_params(jax.device_get(other.init_params(jax.random.key(0))),
                              {"audio_from": str(tmp_path / "w2v")}, other.WARM_STARTS)
