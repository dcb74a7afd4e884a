"""Zero-shot image<->text retrieval, R@1/5/10 both ways (FLAVA's paper: zero-shot COCO TR@1 42.74
/ IR@1 38.38, Flickr30k 67.7 / 65.22; BLIP's: fine-tuned COCO TR@1 80.6 / IR@1 63.1).

BLIP's way: --config.task.rerank_k=K re-scores each query's top K by the ITM head (the reference
uses K = 256 on COCO, 128 on Flickr30k; -1: every pair), --config.task.rerank_score=itm+itc adds
the similarity to the match logit as the reference does (default: the match probability alone).

    --config=configs/eval/retrieval.py        embedded held-out split: 200 images x 5 captions
    --config=configs/eval/retrieval.py:coco   COCO Karpathy 5K test (TFDS coco_captions)
Flickr30k (or any captioned images): write its test split with `python -m flava_jax.data.build
--kind=paired --out=DIR` and set --config.task.data.source=array_record
--config.task.data.paths=DIR --config.task.data.fields.caption=caption (the builder's records hold
one "caption"; the embedded split's hold a list, "captions"). A folder holding other kinds of shards
too is read for its paired ones only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config, tfds_split  # noqa: E402

_DATA = {
    "embedded": data_section("embedded", "retrieval", "test", image="image", caption="captions"),
    "coco": tfds_split("coco_captions", "test", image="image", caption="captions/text"),
}


def get_config(arg=None):
  arg = arg or "embedded"
  if arg not in _DATA:
    raise ValueError(f"unknown variant {arg!r}; use one of {', '.join(_DATA)}")
  return eval_config(dict(evaluator="retrieval", data=_DATA[arg], ks=(1, 5, 10), limit=0,
                          rerank_k=0, rerank_score="itm", batch_size=256, text_length=0,
                          read_threads=8, every_steps=0))
