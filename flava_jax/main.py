"""The flava_jax training binary, for every task (flava_jax/tasks/).

    python -m flava_jax.main --config=configs/flava.py:tiny --workdir=/tmp/flava
    python -m flava_jax.main --config=configs/dvae.py --workdir=/tmp/dvae

Parses flags, joins the other processes of a multi-host run, logs the topology and hands over to
the library: the config's task (`config.task`; FLAVA pretraining by default) trained on the
configured corpora (flava_jax.trainer), resumed from the workdir's checkpoints when there are
some, then the config's evaluations.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "flava.py"),
    "an ml_collections config file, e.g. configs/flava.py:full", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/flava_jax", "where checkpoints and metrics go")
flags.DEFINE_bool("multiprocess", False,
                  "call jax.distributed.initialize() (TPU pods, multi-node GPU)")


def main(argv):
  from flava_jax import trainer  # pylint: disable=import-outside-toplevel  (flag errors first)
  trainer.run_binary(argv, trainer.check_config, trainer.train_and_evaluate)


if __name__ == "__main__":
  app.run(main)
