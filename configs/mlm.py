"""Unimodal stage: masked language modelling of the text encoder on the text corpora.

    python -m flava_jax.main --config=configs/mlm.py --workdir=/tmp/flava_mlm
    python -m flava_jax.main --config=configs/mlm.py:full --workdir=gs://.../mlm \
        --config.data.corpora.text.source=tfds --config.data.corpora.text.name=...

Joint training then starts from it: --config.init.text_from=/tmp/flava_mlm. `full` follows the
RoBERTa recipe FLAVA cites (batch 2048, lr 5e-4, 125K steps). Only the text encoder and its MLM
head train (optimizer.trainable); the rest of the model is carried along untouched.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  config = flava.get_config(arg)
  full = config.variant == "full"
  config.data.corpora = {"text": dict(config.data.corpora.text.to_dict(), weight=1.0)}
  config.optimizer.trainable = ("text_encoder", "mlm_head")
  config.eval.retrieval = False
  if full:
    config.global_batch = 2048
    config.total_steps = 125_000
    config.optimizer.learning_rate = 5e-4
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 10_000
  else:
    config.total_steps = 200
    config.optimizer.warmup_steps = 20
  return config
