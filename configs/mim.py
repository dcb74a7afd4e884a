"""Unimodal stage: masked image modelling of the image encoder on the image corpora.

    python -m flava_jax.main --config=configs/mim.py --workdir=/tmp/flava_mim \
        --config.init.dvae_from=/tmp/flava_dvae

The MIM targets are the codes of the frozen dVAE (init.dvae_from: a configs/dvae.py run or a
converted codebook). Joint training then starts from it: --config.init.image_from=/tmp/flava_mim.
`full` is BEiT-style (batch 2048, lr 1.5e-3, weight decay 0.05). Only the image encoder and its
MIM head train (optimizer.trainable).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  return flava.unimodal_stage(
      arg, "image", ("image_encoder", "mim_head"),
      full={"global_batch": 2048, "total_steps": 100_000, "optimizer.learning_rate": 1.5e-3,
            "optimizer.weight_decay": 0.05, "optimizer.warmup_steps": 10_000})
