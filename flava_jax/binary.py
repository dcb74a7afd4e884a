"""What every flava_jax binary (main, train_dvae, evaluate) does before its work.

Refuses stray arguments, keeps library INFO chatter (orbax) quiet unless `-v` asks for it, joins
the other processes of a multi-host run when --multiprocess, and logs the topology.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags, logging


def start(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if flags.FLAGS.multiprocess:
    jax.distributed.initialize()
  logging.warning("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count(),
                  jax.devices()[0].platform)
