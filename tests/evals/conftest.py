"""A tiny FLAVA trained once per session for the evaluator tests, and the context they share."""

import jax
import pytest

from flava_jax import evaluate, sharding, trainer
from flava_jax.models.config import FlavaConfig
from flava_jax.models.flava import FlavaModel, init_params

from tests.evals.helpers import tiny_config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A training workdir: TRAIN_STEPS steps of the tiny joint recipe on the embedded corpus."""
  workdir = str(tmp_path_factory.mktemp("trained_flava"))
  trainer.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture(scope="session")
def trained_params(trained_workdir):
  return evaluate.load_checkpoint(trained_workdir).params


@pytest.fixture(scope="session")
def random_params():
  config = tiny_config()
  return jax.device_get(init_params(FlavaModel(FlavaConfig.from_dict(config.model)),
                                    trainer.init_key(123)))


@pytest.fixture(scope="session")
def ctx():
  """The evaluation context on all 8 fake devices, as a training run builds it."""
  config = tiny_config()
  mesh = sharding.make_mesh(config.sharding.mesh)
  assert mesh.size == 8
  return evaluate.make_context(FlavaConfig.from_dict(config.model), mesh,
                               sharding.rules_from_config(config.sharding.rules), "",
                               config.paired_text_length)

