"""Zero-shot image classification (paper: zero-shot classification in the vision group).

    --config=configs/eval/zero_shot.py            embedded held-out images, 32 classes
    --config=configs/eval/zero_shot.py:imagenet   ImageNet-1k validation (TFDS imagenet2012)
    --config=configs/eval/zero_shot.py:cifar10    CIFAR-10 test
Own shards (`python -m flava_jax.data.build --kind=image` of class sub-folders, names from the
build's PREFIX.classes.json): --config.task.data.source=array_record --config.task.data.paths=DIR
--config.task.class_names=DIR/image.classes.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config, tfds_split  # noqa: E402

_DATA = {
    "embedded": data_section("embedded", "image", "test"),
    "imagenet": tfds_split("imagenet2012", "validation", image="image", label="label"),
    "cifar10": tfds_split("cifar10", "test", image="image", label="label"),
}


def get_config(arg=None):
  arg = arg or "embedded"
  if arg not in _DATA:
    raise ValueError(f"unknown variant {arg!r}; use one of {', '.join(_DATA)}")
  return eval_config(dict(
      evaluator="zero_shot", data=_DATA[arg],
      class_names="embedded" if arg == "embedded" else "tfds",
      templates=("a photo of a {}.", "a picture of a {}.", "an image with a {}.",
                 "a drawing of a {}.", "a {} in the picture."),
      ks=(1, 5), limit=0, batch_size=256, text_length=0, read_threads=8, every_steps=0))
