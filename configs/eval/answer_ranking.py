"""VQA the BLIP way (flava_jax/evals/answer_ranking.py): the answer decoder, started from the
pretrained decoder, fine-tuned on the training questions with their answers weighted by votes,
then each test question answered by ranking the candidate answers (first token, then the top
k_test whole answers). Paper (ViT-B, 129M images, fine-tuned): VQAv2 test-dev 78.25.

    --config=configs/eval/answer_ranking.py           embedded VQA (15 candidate answers)
    --config=configs/eval/answer_ranking.py:vqav2     VQAv2 (our shards of train/val, the
                                                      reference's 3,128-answer list as a file)
VQAv2 is not in TFDS, and the builder writes no question records yet: write its splits as our
shards with flava_jax.data.records.ShardWriter (one record per question: {"image": JPEG bytes,
"question": str, "answers": [the ten annotators' answers]}), then set
--config.task.train_data.paths=DIR, --config.task.test_data.paths=DIR2 and
--config.task.answer_list=answer_list.json (the reference's candidates, a JSON list). The
reference fine-tunes 10 epochs at lr 2e-5, batch 16 x 16 GPUs, 480 px, k_test 128.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.eval.base import data_section, eval_config  # noqa: E402

_FIELDS = dict(image="image", text="question", answers="answers")


def get_config(arg=None):
  arg = arg or "embedded"
  if arg not in ("embedded", "vqav2"):
    raise ValueError(f"unknown variant {arg!r}; use embedded or vqav2")
  if arg == "embedded":
    train = data_section("embedded", "vqa", "train", **_FIELDS)
    test = data_section("embedded", "vqa", "test", **_FIELDS)
    sizes = dict(answer_list="embedded", k_test=-1, steps=300, train_batch_size=32,
                 learning_rate=1e-3, warmup_steps=30, answer_length=6)
  else:
    train = data_section("array_record", "", "train", **_FIELDS)
    test = data_section("array_record", "", "test", **_FIELDS)
    sizes = dict(answer_list="answer_list.json", k_test=128, steps=20_000, train_batch_size=256,
                 learning_rate=2e-5, warmup_steps=0, answer_length=10)
  return eval_config(dict(
      evaluator="answer_ranking", train_data=train, test_data=test, score_smoothing=0.1,
      label_smoothing=0.1, max_answers=10, weight_decay=0.05, seed=0, log_every_steps=0,
      test_limit=0, batch_size=64, text_length=0, read_threads=8, every_steps=0, **sizes))
