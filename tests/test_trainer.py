"""The training loop on 8 fake CPU devices: losses fall, metrics are written, and a run stopped
after a checkpoint and restarted ends bit-identical to an uninterrupted one."""

import json
import os

import jax
import numpy as np
import pytest

from configs import flava
from flava_jax import trainer


def small_config(steps=6):
  config = flava.get_config("tiny")
  config.global_batch = 16
  config.total_steps = steps
  config.log_every_steps = 1
  config.checkpoint.every_steps = 3
  config.checkpoint.async_save = False
  config.evals = {}
  config.optimizer.warmup_steps = 2
  config.data.corpora = {"paired": config.data.corpora.paired.to_dict()}
  return config


def test_exact_resume_after_a_stop(tmp_path):
  config = small_config()
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  first = trainer.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after=4)
  assert first["stopped_at"] == 4
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed["state"].step) == int(straight["state"].step) == 6
  for a, b in zip(jax.tree.leaves(straight["state"].params),
                  jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = [json.loads(l) for l in open(tmp_path / "straight" / trainer.METRICS_FILE)]
  losses = [l["paired/loss"] for l in lines if "paired/loss" in l]
  assert len(losses) == 6 and losses[-1] < losses[0]
  assert all(l["examples_per_s"] > 0 for l in lines if "examples_per_s" in l)
  assert os.listdir(tmp_path / "straight" / "tensorboard")


def test_batch_not_divisible_by_the_data_parallel_size_fails_at_start_up(tmp_path):
  config = small_config()
  config.global_batch = 12
  with pytest.raises(ValueError, match="global_batch=12 is not divisible by the data-parallel"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_bf16_first_moment_option():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flava_jax import train  # pylint: disable=import-outside-toplevel
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  for dtype in ("float32", "bfloat16"):
    tx = train.make_optimizer(dict(learning_rate=1e-3, warmup_steps=1, mu_dtype=dtype), 10)
    mu = tx.init(params)[0].mu
    assert mu["kernel"].dtype == jnp.dtype(dtype) and mu["bias"].dtype == jnp.dtype(dtype)
  with pytest.raises(ValueError, match="optimizer.mu_dtype='float16'"):
    train.make_optimizer(dict(mu_dtype="float16"), 10)


def test_resuming_with_another_dvae_warns(tmp_path, capsys):
  (tmp_path / trainer.RUN_CONFIG).write_text(json.dumps({"init": {"dvae_from": "/runs/dvae"}}))
  trainer._warn_if_dvae_changed(str(tmp_path), "/runs/dvae")  # pylint: disable=protected-access
  assert "warning" not in capsys.readouterr().out
  trainer._warn_if_dvae_changed(str(tmp_path), "")  # pylint: disable=protected-access
  assert "init.dvae_from='/runs/dvae', now ''" in capsys.readouterr().out
