"""Fine-tuning a classifier head on h_CLS_T, h_CLS_I or h_CLS_M (paper: GLUE from h_CLS_T; VQAv2
72.49, SNLI-VE 78.89, Hateful Memes AUROC 76.09 from h_CLS_M).

    --config=configs/eval/finetune.py:text_pairs   embedded sentence pairs (GLUE-style), h_CLS_T
    --config=configs/eval/finetune.py:vqa          embedded VQA, soft scores, h_CLS_M
    --config=configs/eval/finetune.py:ve           embedded visual entailment (SNLI-VE-style)
    --config=configs/eval/finetune.py:rte          GLUE RTE (TFDS glue/rte); also mrpc, sst2, qnli
Full-size runs follow the paper's recipe with --config.task.steps / learning_rate (VQAv2: lr 1e-4,
44K steps, batch 256; SNLI-VE: lr 1e-5, 24K steps); the defaults are sized for the tiny model.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config, tfds_split  # noqa: E402


def _embedded(name, **fields):
  return [data_section("embedded", name, split, **fields) for split in ("train", "test")]


def _glue(task, test_split="validation", pair=("sentence1", "sentence2")):
  fields = dict(text=pair[0], label="label")
  if pair[1]:
    fields["text_pair"] = pair[1]
  return [tfds_split(f"glue/{task}", split, **fields) for split in ("train", test_split)]


_TASKS = {
    "text_pairs": dict(inputs="text", text_pair=True, target="label", num_classes=2,
                       data=_embedded("text_pairs", text="text", text_pair="text_pair",
                                      label="label"),
                       steps=300, learning_rate=1e-3, text_length=32),
    "vqa": dict(inputs="image_text", target="answers", answer_vocab="embedded",
                data=_embedded("vqa", image="image", text="question", answers="answers"),
                steps=300, learning_rate=1e-3),
    "ve": dict(inputs="image_text", target="label", num_classes=3,
               data=_embedded("ve", image="image", text="hypothesis", label="label"), steps=300,
               learning_rate=1e-3),
    "rte": dict(inputs="text", text_pair=True, target="label", num_classes=2, data=_glue("rte"),
                steps=2000, learning_rate=1e-5, text_length=128),
    "mrpc": dict(inputs="text", text_pair=True, target="label", num_classes=2,
                 data=_glue("mrpc"), steps=2000, learning_rate=1e-5, text_length=128),
    "qnli": dict(inputs="text", text_pair=True, target="label", num_classes=2,
                 data=_glue("qnli", pair=("question", "sentence")), steps=20000,
                 learning_rate=1e-5, text_length=128),
    "sst2": dict(inputs="text", text_pair=False, target="label", num_classes=2,
                 data=_glue("sst2", pair=("sentence", "")), steps=20000, learning_rate=1e-5,
                 text_length=128),
}


def get_config(arg=None):
  arg = arg or "text_pairs"
  if arg not in _TASKS:
    raise ValueError(f"unknown variant {arg!r}; use one of {', '.join(_TASKS)}")
  spec = dict(_TASKS[arg])
  train, test = spec.pop("data")
  task = dict(evaluator="finetune", inputs="text", text_pair=False, target="label",
              num_classes=0, answer_vocab="embedded", hidden_size=0, train_data=train,
              test_data=test, steps=300, train_batch_size=32, learning_rate=1e-4,
              warmup_steps=30, weight_decay=1e-2, seed=0, log_every_steps=50, test_limit=0,
              batch_size=256, text_length=0, read_threads=8, every_steps=0)
  task.update(spec)
  return eval_config(task)
