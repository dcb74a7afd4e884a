"""The tri-modal evaluators (evals/omni_retrieval.py, speech_to_text.py, text_to_image.py and
linear_probe.py's cross-modal features): pair scores are the log-probability of the classes that
keep the pair matched; every matrix takes the query's and the candidate's modalities from the
right records (a fake classifier that recognises the true pairs finds them all, one that
recognises shifted pairs finds none); WER and its baselines are jiwer's; an oracle image decoder
scores code accuracy 1 and the dVAE's round trip; the probe of each subset sees only its
modalities (a fake whose [CLS] carries the label in the audio alone); everything runs end to end
on a random tiny model over built spoken shards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.eval import omni_retrieval as retrieval_config
from configs.eval import linear_probe as probe_config
from configs.eval import speech_to_text as speech_config
from configs.eval import text_to_image as image_config
from flava_jax import evals, evaluate, sharding, tasks
from flava_jax.data import embedded
from flava_jax.evals import linear_probe, omni_retrieval, speech_to_text, text_to_image
from flava_jax.data.tokenizer import Tokenizer
from flava_jax.evals.features import EvalContext
from flava_jax.models.omni import MATCH_CLASSES
from tests.tasks.test_omni_task import small_config

RECORDS = 6
SIZES = {"train": 24, "test": RECORDS}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
  folder = tmp_path_factory.mktemp("spoken")
  embedded.build_spoken(str(folder), SIZES)
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


def _omni():
  """(task, random parameters, evaluation context with the run's dVAE) of the small model."""
  config = small_config(dict(data=1, fsdp=1, tensor=1))
  task = tasks.build(config)
  params = task.init_params(jax.random.key(0))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rules = sharding.rules_from_config(config.sharding.rules)
  load = lambda: task.init_frozen(0, {}, ("trimodal",))  # noqa: E731
  return task, params, evaluate.make_context(task, mesh, rules, "", load_frozen=load)


def test_retrieval_and_speech_to_text_run_on_a_random_model(spoken):
  _, params, ctx = _omni()
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


# --- text to image ---------------------------------------------------------------------------


def test_code_accuracy_and_the_most_frequent_codes():
  true = np.array([[1, 2, 3], [1, 4, 3], [5, 4, 3]])
  assert text_to_image.code_accuracy(np.array([[1, 2, 0], [0, 0, 0], [5, 4, 3]]), true) == 5 / 9
  np.testing.assert_array_equal(text_to_image.most_frequent_codes(true, 8), [1, 4, 3])
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 6, (50, 7))
  want = [np.bincount(codes[:, p], minlength=6).argmax() for p in range(7)]
  np.testing.assert_array_equal(text_to_image.most_frequent_codes(codes, 6), want)


def _image_config(spoken, **overrides):
  return evals.parse(dict(image_config.task(4), data=_data(spoken, "test"),
                          baseline_data=_data(spoken, "train", image="image"), batch_size=8,
                          **overrides), "task")


def test_text_to_image_scores_an_oracle_and_a_random_model(spoken, monkeypatch):
  task, params, ctx = _omni()
  evaluator = evals.build_parsed(_image_config(spoken), ctx, "task")
  metrics = evaluator(params)
  assert metrics["records"] == 4
  assert metrics == evaluator(params)  # the same seed draws the same images
  for mode in ("text", "text_audio"):
    assert 0 <= metrics[f"code_accuracy_{mode}"] < 0.5  # an untrained decoder
    assert 0 < metrics[f"mse_{mode}"] < 1
  assert 0 < metrics["mse_roundtrip"] < 1 and 0 < metrics["mse_other_image"] < 1
  assert 0 <= metrics["code_accuracy_frequent"] <= 1
  # An oracle that draws each image's own codes scores 1 and the dVAE's round trip.
  predict, frozen = ctx.predict, ctx.frozen()
  monkeypatch.setattr(type(predict), "generate_codes", lambda self, p, b, *a: (
      self.image_codes(frozen, b["dvae_pixels"])))
  oracle = evals.build_parsed(_image_config(spoken, modes=("text",)), ctx, "task")(params)
  assert oracle["code_accuracy_text"] == 1.0
  assert oracle["mse_text"] == pytest.approx(metrics["mse_roundtrip"], rel=1e-6)


def test_text_to_image_needs_the_runs_dvae_and_its_decoder(spoken):
  task, params, ctx = _omni()
  bare = dataclasses.replace(ctx, load_frozen=None)
  with pytest.raises(ValueError, match="needs the task's dVAE"):
    evals.build_parsed(_image_config(spoken), bare, "task")
  encoder_only = dataclasses.replace(ctx, load_frozen=lambda: {"encoder": ctx.frozen()["encoder"]})
  with pytest.raises(ValueError, match="has no decoder"):
    evals.build_parsed(_image_config(spoken), encoder_only, "task")(params)
  with pytest.raises(ValueError, match="modes"):
    _image_config(spoken, modes=("image",))


# --- the linear probe with subsets of the modalities -----------------------------------------


def test_modality_subsets_are_parsed_and_checked():
  assert linear_probe.modality_subset("text_audio", "m") == (True, False, True)
  assert linear_probe.modality_subset("image", "m") == (False, True, False)
  for bad in ("video", "text_text", "text+image", ""):
    with pytest.raises(ValueError, match="m="):
      linear_probe.modality_subset(bad, "m")


class LabelInAudio(FakePredictor):
  """A cross-modal [CLS] that carries the record's label only when the audio is given."""

  def cross_modal_cls(self, params, batch, subsets):
    label = jax.nn.one_hot(batch["label"], 32)
    return jnp.stack([label * 10 if present[2] else jnp.zeros_like(label)
                      for present in subsets], axis=1)


def _probe_config(spoken, **overrides):
  fields = dict(image="image", text="caption", audio="audio", label="label")
  return evals.parse(dict(probe_config.task("omni"), train_data=_data(spoken, "train", **fields),
                          test_data=_data(spoken, "train", **fields), batch_size=16,
                          l2_strengths=(1e-3, 1.0), **overrides), "task")


def test_the_probe_gives_each_subset_only_its_modalities(spoken):
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  ctx = EvalContext(predict=LabelInAudio(), mesh=mesh, rules=(),
                    tokenizer=Tokenizer(embedded.vocab_file()), text_length=16)
  metrics = evals.build_parsed(_probe_config(spoken), ctx, "task")({})
  labelled = metrics["test_examples"]  # the one-kind scenes; two-kind ones have no label
  assert 0 < labelled < SIZES["train"]
  # counted in both passes over the split (train and test here)
  assert metrics["skipped/missing_label"] == 2 * (SIZES["train"] - labelled)
  for name in probe_config.MODALITY_SUBSETS:
    if "audio" in name:
      assert metrics[f"{name}/top1"] == 1.0, name
    else:  # nothing to go on: the probe answers the most frequent class
      assert metrics[f"{name}/top1"] == pytest.approx(metrics["majority_class_top1"]), name


def test_the_cross_modal_probe_runs_on_a_random_model(spoken):
  task, params, ctx = _omni()
  metrics = evals.build_parsed(_probe_config(spoken, modalities=("image", "text_image_audio")),
                               ctx, "task")(params)
  assert set(k for k in metrics if k.endswith("/top1")) == {"image/top1",
                                                             "text_image_audio/top1"}
  assert all(0 <= metrics[k] <= 1 for k in metrics if k.endswith("top1"))
