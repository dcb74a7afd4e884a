"""Each stage config trains on 8 fake CPU devices (losses fall) and the stages chain:
dVAE -> MIM image encoder (its codes as targets), MLM text encoder -> joint FLAVA from all three."""

import json

import jax
import numpy as np
import pytest

from configs import dvae as dvae_configs
from configs import flava, mim, mlm
from flava_jax import experiment, trainer, warm_start
from tests.trees import assert_trees_equal, trees_equal


def shrink(config, steps, batch=16):
  config.global_batch = batch
  config.total_steps = steps
  config.log_every_steps = 1
  config.checkpoint.every_steps = steps
  config.checkpoint.async_save = False
  config.optimizer.warmup_steps = 1
  return config


def losses(workdir, key):
  lines = [json.loads(l) for l in open(f"{workdir}/{trainer.METRICS_FILE}")]
  return [l[key] for l in lines if key in l]


def falls(values):
  """The mean of the last third is below the mean of the first third."""
  third = max(len(values) // 3, 1)
  return np.mean(values[-third:]) < np.mean(values[:third])


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  dirs = {k: str(root / k) for k in ("dvae", "mim", "mlm")}

  config = shrink(dvae_configs.get_config("tiny"), steps=12, batch=32)
  config.dvae_training.kl_warmup_steps = 6
  config.dvae_training.temperature_steps = 12
  results = {"dvae": trainer.train_and_evaluate(config, dirs["dvae"])}  # the same binary

  config = shrink(mim.get_config("tiny"), steps=9)
  config.optimizer.learning_rate = 3e-3
  config.init.dvae_from = dirs["dvae"]
  results["mim"] = trainer.train_and_evaluate(config, dirs["mim"])

  config = shrink(mlm.get_config("tiny"), steps=9)
  config.optimizer.learning_rate = 3e-3
  results["mlm"] = trainer.train_and_evaluate(config, dirs["mlm"])
  return dirs, results


def test_dvae_stage_trains_and_reports_held_out_figures(stage_dirs):
  dirs, results = stage_dirs
  # One corpus per step and a line per step: each step's nll, in step order (before: the image
  # lines' values then the paired lines', zipped with every line's step, so not in step order).
  keys = ("image/reconstruction_nll", "paired/reconstruction_nll")
  rows = [json.loads(l) for l in open(f"{dirs['dvae']}/{trainer.METRICS_FILE}")]
  nll = sorted((r["step"], [r[k] for k in keys if k in r]) for r in rows
               if any(k in r for k in keys))
  assert [step for step, _ in nll] == list(range(1, 13)), nll
  assert all(len(values) == 1 for _, values in nll), nll
  assert falls([values[0] for _, values in nll])
  held_out = {k.rpartition("/")[2]: v for k, v in results["dvae"].items()
              if k.startswith("eval/reconstruction/")}
  assert held_out["examples"] == 256 and 0 < held_out["mse"] < 0.2
  assert 1 <= held_out["codes_used"] <= 512


def test_unimodal_stages_train_only_their_encoder(stage_dirs):
  dirs, results = stage_dirs
  assert falls(losses(dirs["mim"], "image/mim"))
  assert falls(losses(dirs["mlm"], "text/mlm"))
  # The untouched groups keep their initial values (same seed, same initialisation).
  init = jax.device_get(experiment.Experiment(mlm.get_config("tiny")).create_state().params)
  mlm_params = jax.device_get(results["mlm"]["state"].params)
  assert set(mlm_params) == set(init)
  for group in init:
    same = trees_equal(init[group], mlm_params[group])
    assert same == (group not in ("text_encoder", "mlm_head")), group


def test_joint_stage_starts_from_the_unimodal_stages_and_trains(stage_dirs, tmp_path):
  dirs, results = stage_dirs
  config = shrink(flava.get_config("tiny"), steps=9, batch=32)
  config.grad_accum = 2
  config.evals = {}
  config.data.corpora = {"paired": config.data.corpora.paired.to_dict()}  # one compile
  config.init.image_from = dirs["mim"]
  config.init.text_from = dirs["mlm"]
  config.init.dvae_from = dirs["dvae"]

  # What the joint run starts from: the stages' encoders and heads, the rest fresh.
  exp = experiment.Experiment(config)
  state = exp.create_state(jax.random.key(5))
  params, notes = warm_start.initial_params(state.params, exp.run.init, exp.task.WARM_STARTS)
  assert len(notes) == 2
  for group, stage in (("image_encoder", "mim"), ("mim_head", "mim"), ("text_encoder", "mlm"),
                       ("mlm_head", "mlm")):
    assert_trees_equal(params[group], jax.device_get(results[stage]["state"].params[group]))
  assert_trees_equal(params["multimodal_encoder"], state.params["multimodal_encoder"])

  trainer.train_and_evaluate(config, str(tmp_path / "joint"))
  lines = [json.loads(l) for l in open(tmp_path / "joint" / trainer.METRICS_FILE)]
  paired = [l["paired/loss"] for l in lines if "paired/loss" in l]
  assert len(paired) == 9 and all(np.isfinite(paired)) and falls(paired)


def test_dvae_targets_come_from_the_trained_dvae(stage_dirs):
  dirs, results = stage_dirs
  loaded = warm_start.read_dvae_params(dirs["dvae"])
  assert_trees_equal(loaded, jax.device_get(results["dvae"]["state"].params))
  with pytest.raises(ValueError, match="init.dvae_from=.* is a FLAVA workdir"):
    warm_start.read_dvae_params(dirs["mlm"])
  with pytest.raises(ValueError, match="init.text_from=.* is a dVAE workdir"):
    warm_start.read_flava_params(dirs["dvae"], "init.text_from")
