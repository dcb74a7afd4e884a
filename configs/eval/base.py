"""What every evaluation config shares (configs/eval/*.py): the task goes under `task`.

    python -m flava_jax.evaluate --config=configs/eval/TASK.py[:VARIANT] --checkpoint=DIR \
        [--config.task.FIELD=VALUE] [--config.vocab_file=PATH]

`task` is one evaluator's fields (flava_jax/evals/): the same mapping runs during training under
a training config's `evals.NAME`. Variants name real datasets by their TFDS names; prepare them
first (`tfds build --file_format=array_record`) and set the task's `data_dir`. The default
variant runs on the embedded corpus's held-out splits. Every split names all of its source's fields
(data_section), so that any of them can be set on the command line, e.g. our own shards:
`--config.task.data.source=array_record --config.task.data.paths=DIR`.
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


# flava_jax.data.sources.CANONICAL_FIELDS (tests/test_configs.py checks they agree).
CANONICAL_FIELDS = ("image", "caption", "text", "label", "text_pair", "answers", "audio")


def data_section(source: str = "embedded", name: str = "", split: str = "test", **fields: str
                 ) -> dict:
  """A split's source with every field a command line may override (SourceConfig's): source,
  name, split, paths (array_record: shard files, globs or a folder), data_dir (tfds) and fields
  (each canonical field -> the records' field; those not given map to their own name)."""
  return dict(source=source, name=name, split=split, paths="", data_dir="",
              fields={f: fields.get(f, f) for f in CANONICAL_FIELDS})


def tfds_split(name: str, split: str, **fields: str) -> dict:
  """A TFDS split with canonical fields mapped to the dataset's feature paths."""
  return data_section("tfds", name, split, **fields)
