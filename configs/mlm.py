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
  return flava.unimodal_stage(
      arg, "text", ("text_encoder", "mlm_head"),
      full={"global_batch": 2048, "total_steps": 125_000, "optimizer.learning_rate": 5e-4,
            "optimizer.weight_decay": 0.01, "optimizer.warmup_steps": 10_000})
