"""What every evaluation config shares (configs/eval/*.py): the task goes under `task`.

    python -m flava_jax.evaluate --config=configs/eval/TASK.py[:VARIANT] --checkpoint=DIR \
        [--config.task.FIELD=VALUE] [--config.vocab_file=PATH]

`task` is one evaluator's fields (flava_jax/evals/): the same mapping runs during training under
a training config's `evals.NAME`. Variants name real datasets by their TFDS names; prepare them
first (`tfds build --file_format=array_record`) and set the task's `data_dir`. The default
variant runs on the embedded corpus's held-out splits.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top


def eval_config(task: dict) -> ml_collections.ConfigDict:
  base = flava.get_config("tiny")
  return ml_collections.ConfigDict(dict(
      task=task,
      vocab_file="",  # "" = the checkpoint's (its run config's, or DIR/vocab.txt), else embedded
      cache_dir="",   # the embedded corpus's cache ("" = $FLAVA_JAX_CACHE or ~/.cache/flava_jax)
      text_length=0,  # tokens per text; 0 = the checkpoint's caption length (77 if unknown)
      sharding=dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules=base.sharding.rules),
  ))


def tfds_split(name: str, split: str, **fields: str) -> dict:
  """A TFDS split with canonical fields mapped to the dataset's feature paths."""
  return dict(source="tfds", name=name, split=split, data_dir="", fields=dict(fields))
