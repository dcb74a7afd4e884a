"""Each stage config trains on 8 fake CPU devices (losses fall) and the stages chain:
dVAE -> MIM image encoder (its codes as targets), MLM text encoder -> joint FLAVA from all three."""

import json

import jax
import numpy as np
import pytest

from configs import dvae as dvae_configs
from configs import flava, mim, mlm
from flava_jax import sharding, train, train_dvae, trainer, warm_start
from flava_jax.models.config import FlavaConfig
from flava_jax.models.flava import FlavaModel


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
  results = {"dvae": train_dvae.train_dvae(config, dirs["dvae"])}

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
  nll = losses(dirs["dvae"], "image/reconstruction_nll") + losses(dirs["dvae"],
                                                                  "paired/reconstruction_nll")
  assert len(nll) == 12
  steps = [json.loads(l)["step"] for l in open(f"{dirs['dvae']}/{trainer.METRICS_FILE}")]
  ordered = [v for _, v in sorted(zip(steps, nll))]
  assert falls(ordered)
  held_out = results["dvae"]
  assert held_out["examples"] == 256 and 0 < held_out["mse"] < 0.2
  assert 1 <= held_out["codes_used"] <= 512


def test_unimodal_stages_train_only_their_encoder(stage_dirs):
  dirs, results = stage_dirs
  assert falls(losses(dirs["mim"], "image/mim"))
  assert falls(losses(dirs["mlm"], "text/mlm"))
  # The untouched groups keep their initial values (same seed, same initialisation).
  config = flava.get_config("tiny")
  model = FlavaModel(FlavaConfig.from_dict(config.model))
  init = jax.device_get(train.create_train_state(
      model, train.make_optimizer(config.optimizer, 10), trainer.init_key(config.seed),
      sharding.make_mesh(config.sharding.mesh),
      sharding.rules_from_config(config.sharding.rules))[0].params)
  mlm_params = jax.device_get(results["mlm"]["state"].params)
  for group in init:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[group]),
                                                    jax.tree.leaves(mlm_params[group])))
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
  model = FlavaModel(FlavaConfig.from_dict(config.model))
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
  state, _ = train.create_train_state(model, train.make_optimizer(config.optimizer, 10),
                                      jax.random.key(5), mesh, ())
  params, notes = warm_start.initial_params(
      state.params, warm_start.InitConfig(image_from=dirs["mim"], text_from=dirs["mlm"]))
  assert len(notes) == 2
  for group, stage in (("image_encoder", "mim"), ("mim_head", "mim"), ("text_encoder", "mlm"),
                       ("mlm_head", "mlm")):
    trained = jax.device_get(results[stage]["state"].params[group])
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params[group])):
      np.testing.assert_array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.params["multimodal_encoder"]),
                  jax.tree.leaves(params["multimodal_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  trainer.train_and_evaluate(config, str(tmp_path / "joint"))
  lines = [json.loads(l) for l in open(tmp_path / "joint" / trainer.METRICS_FILE)]
  paired = [l["paired/loss"] for l in lines if "paired/loss" in l]
  assert len(paired) == 9 and all(np.isfinite(paired)) and falls(paired)


def test_dvae_targets_come_from_the_trained_dvae(stage_dirs):
  dirs, results = stage_dirs
  loaded = warm_start.read_dvae_params(dirs["dvae"])
  trained = jax.device_get(results["dvae"]["state"].params)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="init.dvae_from=.* is a FLAVA workdir"):
    warm_start.read_dvae_params(dirs["mlm"])
  with pytest.raises(ValueError, match="init.text_from=.* is a dVAE workdir"):
    warm_start.read_flava_params(dirs["dvae"], "init.text_from")
