"""A CLIP-style two-tower contrastive model (flava_jax/tasks/clip.py) on the paired corpora.

    python -m flava_jax.main --config=configs/clip.py --workdir=/tmp/clip
    python -m flava_jax.main --config=configs/clip.py --config.grad_accum=4 \
        --config.grad_cache=True     # every negative of the global batch, 4 micro-batches

The towers take FLAVA's image and text encoder sizes (`tiny` or `full`); the paired corpora,
optimizer, checkpoints and sharding are configs/flava.py's. Evaluation: zero-shot retrieval on the
embedded held-out pairs at the end.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  base = flava.get_config(arg)
  full = base.variant == "full"
  config = ml_collections.ConfigDict()
  config.task = "clip"
  config.variant = base.variant
  config.model = base.model
  config.model.multimodal.num_layers = 1  # unused by the two towers
  config.seed = 0
  config.global_batch = 32768 if full else 32
  config.paired_text_length = base.paired_text_length
  config.total_steps = base.total_steps if full else 300
  config.log_every_steps = base.log_every_steps
  config.grad_accum = 1
  config.grad_cache = False
  config.checkpoint = base.checkpoint
  config.optimizer = base.optimizer
  data = base.data
  data.corpora = {"paired": dict(data.corpora.paired.to_dict(), weight=1.0)}
  config.data = data
  config.evals = ml_collections.ConfigDict(dict(retrieval=base.evals.retrieval.to_dict()))
  config.init = ml_collections.ConfigDict(dict(model_from=""))
  config.sharding = base.sharding
  return config
