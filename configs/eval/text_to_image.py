"""Text to image with the tri-modal model's image decoder (flava_jax/evals/text_to_image.py):
dVAE codes sampled top-k from the caption alone and from the caption and its recording, decoded
by the run's dVAE; code accuracy and pixel error beside the dVAE's own round trip, another
image's and the most frequent codes'.

    python -m flava_jax.evaluate --config=configs/eval/text_to_image.py --checkpoint=WORKDIR
The checkpoint must be a training workdir: the dVAE is the run's (init.dvae_from, or the random
one of its seed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config  # noqa: E402


def task(limit: int = 100) -> dict:
  return dict(evaluator="text_to_image",
              data=data_section("embedded", "spoken", "test", image="image", caption="caption",
                                audio="audio"),
              baseline_data=data_section("embedded", "spoken", "train", image="image"),
              baseline_limit=1000, limit=limit, modes=("text", "text_audio"), top_k=32,
              temperature=1.0, seed=0, max_audio_seconds=600.0, batch_size=256, text_length=0,
              read_threads=8, every_steps=0)


def get_config(arg=None):
  if arg not in (None, "embedded"):
    raise ValueError(f"unknown variant {arg!r}; use embedded")
  return eval_config(task())
