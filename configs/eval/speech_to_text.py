"""Speech to text with the tri-modal model's text decoder, word error rate from the recording
alone and from the recording and its image (flava_jax/evals/speech_to_text.py), beside the
empty and the best constant transcriptions.

    python -m flava_jax.evaluate --config=configs/eval/speech_to_text.py --checkpoint=WORKDIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config  # noqa: E402


def task(limit: int = 100) -> dict:
  return dict(evaluator="speech_to_text",
              data=data_section("embedded", "spoken", "test", image="image", caption="caption",
                                audio="audio"),
              baseline_data=data_section("embedded", "spoken", "train", caption="caption"),
              limit=limit, modes=("audio", "audio_image"), max_length=0, examples=3,
              max_audio_seconds=600.0, batch_size=256, text_length=0, read_threads=8,
              every_steps=0)


def get_config(arg=None):
  if arg not in (None, "embedded"):
    raise ValueError(f"unknown variant {arg!r}; use embedded")
  return eval_config(task())
