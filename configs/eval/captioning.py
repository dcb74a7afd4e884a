"""Captions of held-out images by a model with a captioning decoder (BLIP): BLEU-1..4 and CIDEr-D
against the reference captions (paper, COCO Karpathy test, fine-tuned ViT-B: BLEU-4 39.7, CIDEr
133.3, i.e. 0.397 and 1.333 as printed here), and whether a caption names what is in its own
image: the share of its content words (colours and shapes in the embedded corpus) found in its
image's reference captions, against the share found in another image's
(flava_jax/evals/captioning.py).

    --config=configs/eval/captioning.py            embedded held-out pairs (256 scenes, 1 caption)
    --config=configs/eval/captioning.py:sample     the same, nucleus sampling (top-p 0.9, CapFilt's)
    --config=configs/eval/captioning.py:five       embedded 200 scenes x 5 captions (COCO-like)
    --config=configs/eval/captioning.py:coco       COCO Karpathy 5K test (TFDS coco_captions)
Flickr30k or other captioned images: our shards (`python -m flava_jax.data.build --kind=paired`)
with --config.task.data.source=array_record --config.task.data.paths=DIR.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config, tfds_split  # noqa: E402

_DATA = {
    "beam": data_section("embedded", "paired", "test", image="image", caption="caption"),
    "five": data_section("embedded", "retrieval", "test", image="image", caption="captions"),
    "coco": tfds_split("coco_captions", "test", image="image", caption="captions/text"),
}


def get_config(arg=None):
  arg = arg or "beam"
  if arg not in ("beam", "sample", "five", "coco"):
    raise ValueError(f"unknown variant {arg!r}; use beam, sample, five or coco")
  method = "sample" if arg == "sample" else "beam"
  return eval_config(dict(
      evaluator="captioning", data=_DATA.get(arg, _DATA["beam"]),
      prompt="a picture of ", method=method, max_length=20, min_length=5, num_beams=3, top_p=0.9,
      repetition_penalty=1.0 if method == "beam" else 1.1, seed=0, words=(), limit=0,
      batch_size=64, text_length=0, read_threads=8, every_steps=0))
