"""The tri-modal evaluators (evals/omni_retrieval.py, evals/speech_to_text.py): pair scores are
the log-probability of the classes that keep the pair matched; every matrix takes the query's
and the candidate's modalities from the right records (a fake classifier that recognises the
true pairs finds them all, one that recognises shifted pairs finds none); WER and its baselines
are jiwer's; both run end to end on a random tiny model over built spoken shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.eval import omni_retrieval as retrieval_config
from configs.eval import speech_to_text as speech_config
from flava_jax import evals, evaluate, sharding, tasks
from flava_jax.data import embedded
from flava_jax.evals import omni_retrieval, speech_to_text
from flava_jax.evals.features import EvalContext
from flava_jax.models.omni import MATCH_CLASSES
from tests.tasks.test_omni_task import small_config

RECORDS = 6


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
  folder = tmp_path_factory.mktemp("spoken")
  embedded.build_spoken(str(folder), {"train": 8, "test": RECORDS})
  return str(folder)


def _data(folder, split, **fields):
  return dict(source="array_record", name="", split="",
              paths=f"{folder}/spoken-{split}-00000-of-00001.array_record", data_dir="",
              fields=fields or dict(image="image", caption="caption", audio="audio"))


def test_pair_scores_add_the_probabilities_of_the_matched_classes():
  logits = np.random.default_rng(0).normal(size=(4, 5))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  got = omni_retrieval.pair_scores(logits, ("all", "text_image"))
  want = np.log(p[:, MATCH_CLASSES.index("all")] + p[:, MATCH_CLASSES.index("text_image")])
  np.testing.assert_allclose(got, want, rtol=1e-12)


class FakePredictor:
  """Unimodal 'states' that carry each record's index; the classifier's first logit spells the
  records its present modalities come from: 100 * text + 10 * image + audio (9: absent)."""

  image_size, audio_samples, text_length, text_vocab_size, max_text_length = 32, 6400, 16, 1024, 40

  def logical_axes(self):
    return {}

  def unimodal(self, params, batch):
    ids = batch["index"].astype(jnp.float32)
    column = jnp.broadcast_to(ids[:, None, None], (ids.shape[0], 1, 1))
    ones = jnp.ones((ids.shape[0], 1), bool)
    return {"text": column, "attention": ones, "image": column, "audio": column,
            "frames": ones}

  def match_from_states(self, params, states, present):
    digits = [states[k][:, 0, 0] if p else jnp.full(states[k].shape[:1], 9.0)
              for k, p in zip(("text", "image", "audio"), present)]
    code = 100 * digits[0] + 10 * digits[1] + digits[2]
    return jnp.zeros((code.shape[0], 5)).at[:, 0].set(code)


def _fake_evaluator(spoken, monkeypatch):
  cfg = evals.parse(dict(retrieval_config.task(RECORDS), data=_data(spoken, "test"),
                         batch_size=16), "task")
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  ctx = EvalContext(predict=FakePredictor(), mesh=mesh, rules=(), tokenizer=None,
                    text_length=16)
  evaluator = omni_retrieval.Evaluator(cfg, ctx, "task")
  # rows need no decoding here: the fake reads the record index only
  monkeypatch.setattr(evaluator, "row", lambda i: {"x": np.zeros(1, np.float32)})
  return evaluator


def test_every_matrix_takes_each_modality_from_the_right_record(spoken, monkeypatch):
  evaluator = _fake_evaluator(spoken, monkeypatch)
  monkeypatch.setattr(omni_retrieval, "pair_scores", lambda logits, classes: logits[:, 0])
  states, _ = evaluator.ctx.map_split(RECORDS, evaluator.row, FakePredictor().unimodal, {})
  q, c = np.meshgrid(np.arange(RECORDS), np.arange(RECORDS), indexing="ij")  # query, candidate
  want = {"text_image": 100 * q + 10 * c + 9, "text_audio": 100 * q + 90 + c,
          "ta2i": 100 * q + 10 * c + q, "ia2t": 100 * c + 10 * q + q,
          "ti2a": 100 * q + 10 * q + c}
  for name, expected in want.items():
    np.testing.assert_array_equal(evaluator.matrix({}, states, name), expected, err_msg=name)


def test_directions_rank_candidates_for_queries(spoken, monkeypatch):
  evaluator = _fake_evaluator(spoken, monkeypatch)
  # Every query's own candidate scores best; candidate 0 also scores best for every query but 0
  # behind it, so that as a query candidate 0's own row is found, but backwards it is not.
  scores = np.eye(RECORDS) * 2.0
  scores[1:, 0] = 3.0
  monkeypatch.setattr(evaluator, "matrix", lambda params, states, name: scores.copy())
  metrics = evaluator({})
  for forward, backward in (("t2i", "i2t"), ("t2a", "a2t")):
    assert metrics[f"{forward}_r1"] == pytest.approx(1 / RECORDS)  # only query 0 finds its own
    assert metrics[f"{backward}_r1"] == pytest.approx(1.0 - 1 / RECORDS)  # all but column 0
  assert metrics["ta2i_r1"] == metrics["t2i_r1"]


def test_word_error_rates_and_the_constant_baseline():
  references = ["a red circle", "two blue squares", "a red square"]
  assert speech_to_text.word_error_rate(references, references) == 0.0
  assert speech_to_text.word_error_rate(references, ["", "", ""]) == 1.0
  # one substitution in 3 words, one deletion in 3, nothing of 3: (1 + 1 + 3) / 9
  assert speech_to_text.word_error_rate(references, ["a blue circle", "two blue", ""]
                                        ) == pytest.approx(5 / 9)
  wer, constant = speech_to_text.best_constant(references, ["a red circle", "zebra", ""])
  assert constant == "a red circle" and wer == pytest.approx((0 + 3 + 1) / 9)


def test_both_evaluators_run_on_a_random_model(spoken):
  config = small_config(dict(data=1, fsdp=1, tensor=1))
  task = tasks.build(config)
  params = task.init_params(jax.random.key(0))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rules = sharding.rules_from_config(config.sharding.rules)
  ctx = evaluate.make_context(task, mesh, rules, "")
  cfg = evals.parse(dict(retrieval_config.task(4), data=_data(spoken, "test"), batch_size=16,
                         matrices=("text_image", "ta2i")), "task")
  metrics = evals.build_parsed(cfg, ctx, "task")(params)
  assert metrics["records"] == 4 and metrics["chance_r1"] == 0.25
  for name in ("t2i", "i2t", "ta2i"):
    assert 0 < metrics[f"{name}_r1"] <= metrics[f"{name}_r5"] <= 1
  cfg = evals.parse(dict(speech_config.task(4), data=_data(spoken, "test"),
                         baseline_data=_data(spoken, "train", caption="caption"),
                         batch_size=8, max_length=6), "task")
  metrics = evals.build_parsed(cfg, ctx, "task")(params)
  assert metrics["records"] == 4 and metrics["wer_empty"] == 1.0
  assert 0 < metrics["wer_best_constant"] < 1.5
  for mode in ("audio", "audio_image"):
    assert metrics[f"wer_{mode}"] > 0.5  # an untrained decoder writes nonsense
