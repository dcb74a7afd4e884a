"""The tiny FLAVA run the evaluator tests evaluate (tests/conftest.py's trained_workdir), as a
config file for the binary: `python -m flava_jax.main --config=tests/evals/trained_config.py`."""

from tests.evals.helpers import tiny_config


def get_config(arg=None):
  del arg
  return tiny_config()
