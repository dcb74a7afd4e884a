"""VQA's soft scores and accuracy, by hand: an answer given by n of the annotators scores
min(n / 3, 1); the accuracy of a prediction is its answer's score, averaged over the questions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from flava_jax import evals
from flava_jax.evals import finetune
from flava_jax.evals.features import INDEX_KEY
from tests.data import helpers

VOCAB = {"yes": 0, "no": 1, "two": 2, "red": 3, "blue": 4}


def test_soft_scores_of_ten_annotators():
  answers = ["yes"] * 2 + ["no"] * 7 + ["green"]  # green: not in the vocabulary, no score
  np.testing.assert_array_equal(finetune.soft_scores(answers, VOCAB),
                                np.float32([2 / 3, 1, 0, 0, 0]))
  scores = finetune.soft_scores(["red"] * 3 + ["blue"] * 6 + ["two"], VOCAB)
  assert scores.dtype == np.float32 and scores.shape == (5,)
  np.testing.assert_allclose(scores, [0, 0, 1 / 3, 1, 1], rtol=1e-7)
  assert scores[VOCAB["red"]] == 1.0  # exactly 3 votes already score 1


def test_soft_scores_normalise_answers_and_accept_the_forms_sources_give():
  # Case and whitespace are folded: " Two", "TWO" and "two  " are three votes for "two".
  np.testing.assert_allclose(finetune.soft_scores([" Two", "TWO", "two  ", "No"], VOCAB),
                             [0, 1 / 3, 1, 0, 0], rtol=1e-7)
  # TFDS gives numpy arrays of bytes; a single answer may come as a string.
  np.testing.assert_allclose(
      finetune.soft_scores(np.array([b"yes", b"yes", b"blue"], dtype=object), VOCAB),
      [2 / 3, 0, 0, 0, 1 / 3], rtol=1e-7)
  np.testing.assert_allclose(finetune.soft_scores("red", VOCAB), [0, 0, 0, 1 / 3, 0], rtol=1e-7)
  for nothing in (None, [], ["purple"] * 10):
    np.testing.assert_array_equal(finetune.soft_scores(nothing, VOCAB), np.zeros(5, np.float32))


# Five questions, ten annotators each, and the answer the model is made to predict for each.
QUESTIONS = [
    (["yes"] * 2 + ["no"] * 8, "yes"),            # 2 votes: 2/3
    (["two"] * 3 + ["Two "] + ["red"] * 6, "two"),  # 4 votes (case folded): 1
    (["blue"] + ["green"] * 9, "red"),            # red never given: 0
    (["red"] * 10, "red"),                        # 10 votes: 1
    (["no"] + ["yes"] * 9, "no"),                 # 1 vote: 1/3
]
ACCURACY = (2 / 3 + 1 + 0 + 1 + 1 / 3) / 5  # 0.6
# The best answer to give every question: red (scores 1 on the 2nd and the 4th) -> 2/5; the next
# best, yes (2/3 on the 1st, 1 on the 5th) -> 1/3.
BEST_CONSTANT = 2 / 5


@pytest.fixture(scope="module")
def vqa_evaluator(tmp_path_factory, ctx):
  """A VQA fine-tuning evaluator reading QUESTIONS from own shards (one, so that the split's
  order is QUESTIONS' order), with VOCAB's answers."""
  root = tmp_path_factory.mktemp("vqa")
  (root / "shards").mkdir()
  helpers.write_shards(str(root / "shards" / "vqa"),
                       [{"text": f"question {i}?", "answers": answers}
                        for i, (answers, _) in enumerate(QUESTIONS)], num_shards=1)
  (root / "answers.json").write_text(json.dumps(sorted(VOCAB, key=VOCAB.get)))
  split = dict(source="array_record", paths=str(root / "shards"))
  return evals.build(dict(evaluator="finetune", inputs="text", target="answers",
                          answer_vocab=str(root / "answers.json"), train_data=split,
                          test_data=split, steps=0, batch_size=8), ctx, "evals.vqa")


def test_vqa_accuracy_of_a_batch_is_the_mean_score_of_the_predicted_answers(vqa_evaluator,
                                                                           monkeypatch):
  """The test split read and scored as the evaluator does it (5 questions in one 8-row batch over
  8 devices: 3 padding rows left out), with logits that predict QUESTIONS' answers."""
  assert vqa_evaluator.answers == VOCAB and vqa_evaluator.num_classes == 5
  predicted = np.array([VOCAB[answer] for _, answer in QUESTIONS])
  logits = np.eye(5, dtype=np.float32)[predicted] * 4.0 - 1.0  # argmax: the chosen answer

  def outputs(params, batch):
    del params
    rows = jnp.asarray(logits)[jnp.maximum(batch[INDEX_KEY], 0)]  # -1: a padding row
    return {"logits": rows, "target": batch["target"]}

  monkeypatch.setattr(vqa_evaluator, "_test_outputs", outputs)
  figures = vqa_evaluator.score(params={})
  assert figures["test_examples"] == 5
  assert figures["vqa_accuracy"] == pytest.approx(ACCURACY, abs=1e-6)
  assert figures["constant_baseline"] == pytest.approx(BEST_CONSTANT, abs=1e-6)
  assert not [k for k in figures if k.startswith("skipped/")]
