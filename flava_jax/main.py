"""The flava_jax binary.

    python -m flava_jax.main --config=configs/flava.py:tiny --workdir=/tmp/flava

Parses flags, joins the other processes of a multi-host run, logs the topology and hands over to
the library: FLAVA pretraining on the configured corpora (flava_jax.trainer), resumed from the
workdir's checkpoints when there are some, then held-out zero-shot retrieval.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "flava.py"),
    "an ml_collections config file, e.g. configs/flava.py:full", lock_config=True)
flags.DEFINE_string("workdir", "/tmp/flava_jax", "where checkpoints and metrics go")
flags.DEFINE_bool("multiprocess", False,
                  "call jax.distributed.initialize() (TPU pods, multi-node GPU)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  from flava_jax import trainer  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax) only when asked: -v 0
  if flags.FLAGS.multiprocess:
    jax.distributed.initialize()
  logging.warning("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    trainer.check_config(flags.FLAGS.config)
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise app.UsageError(f"bad config: {e}") from None
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
