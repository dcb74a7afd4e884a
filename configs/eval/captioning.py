"""Captions of held-out images by a model with a captioning decoder (BLIP), and whether they name
what is in their own image: the share of a caption's content words (colours and shapes in the
embedded corpus) found in its image's reference captions, against the share found in another
image's (flava_jax/evals/captioning.py).

    --config=configs/eval/captioning.py            embedded held-out pairs (256 scenes)
    --config=configs/eval/captioning.py:sample     nucleus sampling (top-p 0.9), CapFilt's way
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config  # noqa: E402


def get_config(arg=None):
  arg = arg or "beam"
  if arg not in ("beam", "sample"):
    raise ValueError(f"unknown variant {arg!r}; use beam or sample")
  return eval_config(dict(
      evaluator="captioning",
      data=data_section("embedded", "paired", "test", image="image", caption="caption"),
      prompt="a picture of ", method=arg, max_length=20, min_length=5, num_beams=3, top_p=0.9,
      repetition_penalty=1.0 if arg == "beam" else 1.1, seed=0, words=(), limit=0,
      batch_size=64, text_length=0, read_threads=8, every_steps=0))
