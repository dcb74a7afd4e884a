"""Evaluating on one's own shards as the configs document it: the builder's output folder named
with --config.task.data.paths=DIR (and a training config's --config.evals.NAME.data.paths=DIR),
each split reading the shards of the kind it needs from a folder holding several builds."""

import os

import pytest

from flava_jax import evals, evaluate
from tests.data import builds
from tests.flag_parsing import parse_config_flags


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return builds.mixed_folder(str(tmp_path_factory.mktemp("own_shards")))


def test_retrieval_on_own_paired_shards_as_documented(folder, ctx):
  shards, written = folder
  config = parse_config_flags("eval/retrieval.py", "--config.task.data.source=array_record",
                              f"--config.task.data.paths={shards}",
                              "--config.task.data.fields.caption=caption")
  evaluate.check_config(config)
  evaluator = evals.build(config.task, ctx, "task")
  assert evaluator.count == written["paired"] == 6
  assert sorted(evaluator.texts) == [f"a picture number {i}" for i in range(6)]


def test_zero_shot_and_linear_probe_on_own_image_shards(folder, ctx):
  shards, written = folder
  config = parse_config_flags("eval/zero_shot.py", "--config.task.data.source=array_record",
                              f"--config.task.data.paths={shards}",
                              f"--config.task.class_names={shards}/image.classes.json")
  evaluator = evals.build(config.task, ctx, "task")
  assert evaluator.count == written["image"] and evaluator.class_names == ["cat", "dog"]
  overrides = [f"--config.task.{split}.{field}={value}"
               for split in ("train_data", "validation_data", "test_data")
               for field, value in (("source", "array_record"), ("paths", shards))]
  config = parse_config_flags("eval/linear_probe.py", *overrides)
  probe = evals.build(config.task, ctx, "task")
  assert len(probe.train) == len(probe.validation) == len(probe.test) == written["image"]
  assert probe.validation is not None
  assert evals.build(parse_config_flags("eval/linear_probe.py").task, ctx,
                     "task").validation is None  # source "": a fifth of train


def test_training_configs_evals_on_own_shards(folder, ctx):
  shards, written = folder
  config = parse_config_flags(
      "flava.py", "--config.evals.retrieval.data.source=array_record",
      f"--config.evals.retrieval.data.paths={shards}",
      "--config.evals.zero_shot.data.source=array_record",
      f"--config.evals.zero_shot.data.paths={os.path.join(shards, 'image-*')}")
  retrieval = evals.build(config.evals.retrieval, ctx, "evals.retrieval")
  zero_shot = evals.build(config.evals.zero_shot, ctx, "evals.zero_shot")
  assert (retrieval.count, zero_shot.count) == (written["paired"], written["image"])
