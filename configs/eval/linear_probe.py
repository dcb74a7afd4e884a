"""Linear probe on frozen h_CLS_I (paper: ImageNet linear probe 75.54; 22 vision datasets).

    --config=configs/eval/linear_probe.py            embedded images, 32 classes
    --config=configs/eval/linear_probe.py:imagenet   ImageNet-1k (train -> validation)
    --config=configs/eval/linear_probe.py:cifar10    CIFAR-10
    --config=configs/eval/linear_probe.py:omni       the tri-modal model's cross-modal [CLS]
        given each subset of text, image and audio: the embedded spoken part's one-kind scenes,
        labelled by their (colour, shape) class (two-kind scenes have none and are counted)
The L2 strength is swept over 1e-6..1e6 on a held-out fifth of the train split, or on a split of
its own: --config.task.validation_data.source=array_record --config.task.validation_data.paths=DIR.
Figures: top1 (test accuracy of the refitted probe), validation_top1 and l2_strength (the sweep's
best), majority_class_top1 (always answering the train split's most frequent class) and
chance_top1 (1 / classes in the train split).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config, tfds_split  # noqa: E402


def _splits(arg):
  if arg == "embedded":
    return data_section("embedded", "image", "train"), data_section("embedded", "image", "test")
  name, test = {"imagenet": ("imagenet2012", "validation"), "cifar10": ("cifar10", "test")}[arg]
  return (tfds_split(name, "train", image="image", label="label"),
          tfds_split(name, test, image="image", label="label"))


MODALITY_SUBSETS = ("text", "image", "audio", "text_image", "text_audio", "image_audio",
                    "text_image_audio")


def task(arg: str = "embedded", train_limit: int = 0) -> dict:
  if arg == "omni":
    spoken = dict(image="image", text="caption", audio="audio", label="label")
    train = data_section("embedded", "spoken", "train", **spoken)
    test = data_section("embedded", "spoken", "test", **spoken)
  else:
    train, test = _splits(arg)
  return dict(
      evaluator="linear_probe", features="cross_modal" if arg == "omni" else "image",
      modalities=MODALITY_SUBSETS, train_data=train,
      validation_data=data_section(source="", split=""),  # source "": a fifth of train
      test_data=test, validation_fraction=0.2, l2_strengths=tuple(10.0 ** e for e in range(-6, 7)),
      max_iterations=1000, fit_threads=1, train_limit=train_limit, seed=0, batch_size=256,
      text_length=0, read_threads=8, every_steps=0)


def get_config(arg=None):
  arg = arg or "embedded"
  if arg not in ("embedded", "imagenet", "cifar10", "omni"):
    raise ValueError(f"unknown variant {arg!r}; use embedded, imagenet, cifar10 or omni")
  return eval_config(task(arg))
