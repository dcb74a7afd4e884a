"""CapFilt (python -m flava_jax.tools.capfilt): from a pretrained BLIP, a captioner and a filter
fine-tuned on human pairs, one synthetic caption per web image, web and synthetic captions kept
where the filter's ITM match probability reaches `threshold` (the paper's 0.5).

    --config=configs/capfilt.py          the embedded corpus: human (1,000) and web (6,000) pairs
Real corpora: set human and web to their splits, e.g. --config.human.source=tfds
--config.human.name=coco_captions --config.human.fields.caption=captions/text and
--config.web.source=array_record --config.web.paths=DIR (our shards of the web pairs), and the
captioner's and filter's training configs (config.captioner / config.filter: configs/blip.py's
captioner and filter variants, sized for the tiny model) to the paper's fine-tuning recipe.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import blip  # noqa: E402  pylint: disable=g-import-not-at-top
from configs.eval.base import data_section  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg=None):
  del arg
  captioner = blip.get_config("captioner")
  return ml_collections.ConfigDict(dict(
      captioner=captioner,
      filter=blip.get_config("filter"),
      human=data_section("embedded", "human", "train", image="image", caption="caption"),
      web=data_section("embedded", "web", "train", image="image", caption="caption"),
      # The captioner's decoding: nucleus sampling as the paper's CapFilt (top-k 50 as the
      # reference's generate leaves it), one caption per image, deterministic under seed.
      prompt="a picture of ", top_p=0.9, top_k=50, repetition_penalty=1.1, max_length=20,
      min_length=5, seed=0,
      threshold=0.5,
      shard_size=1000,  # web images per output shard (the unit a restart skips)
      batch_size=256,
      read_threads=8,
      sharding=captioner.sharding,
  ))
