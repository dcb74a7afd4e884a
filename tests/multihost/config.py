"""configs/flava.py's tiny default cut for the multi-process tests: paired and text corpora
mixed per step (every process must draw the same kind each step; two kinds are two compiles per
start, against three with the image corpus), a tiny global batch, 12 steps, a checkpoint every 4,
no evaluation at the end (the tests evaluate the checkpoints themselves). `python -m flava_jax.main
--config=tests/multihost/config.py`."""

from configs import flava


def get_config(arg=None):
  config = flava.get_config(arg or "tiny")
  config.global_batch = 16
  config.total_steps = 12
  config.log_every_steps = 1
  config.checkpoint.every_steps = 4
  config.checkpoint.async_save = False
  config.optimizer.warmup_steps = 2
  config.evals = {}
  del config.data.corpora["image"]
  return config
