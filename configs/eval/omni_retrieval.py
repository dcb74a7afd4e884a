"""Retrieval among captions, images and recordings with the tri-modal model's match classifier
(flava_jax/evals/omni_retrieval.py): i2t, t2i, t2a, a2t without the third modality, and ta2i,
ia2t, ti2a with it. OPT's paper (OpenImage-5K, R@1): I->T 39.4, T->I 41.96, A->T 80.3, T->A 78.0.

    python -m flava_jax.evaluate --config=configs/eval/omni_retrieval.py --checkpoint=WORKDIR
    --config.task.limit=N   records used (every pair of N is scored: N^2 per matrix)
Shards of `python -m flava_jax.data.build --kind=trimodal`: --config.task.data.source=
array_record --config.task.data.paths=DIR.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config  # noqa: E402

MATRICES = ("text_image", "text_audio", "ta2i", "ia2t", "ti2a")


def task(limit: int = 100) -> dict:
  return dict(evaluator="omni_retrieval",
              data=data_section("embedded", "spoken", "test", image="image", caption="caption",
                                audio="audio"),
              ks=(1, 5, 10), limit=limit, matrices=MATRICES, max_audio_seconds=600.0,
              batch_size=256, text_length=0, read_threads=8, every_steps=0)


def get_config(arg=None):
  if arg not in (None, "embedded"):
    raise ValueError(f"unknown variant {arg!r}; use embedded")
  return eval_config(task())
