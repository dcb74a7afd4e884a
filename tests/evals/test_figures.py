"""The linear probe's figures say what they are, and printed figures keep their digits."""

import numpy as np
import pytest

from flava_jax import evals, evaluate
from flava_jax.evals import linear_probe


def test_small_figures_keep_their_digits_when_printed():
  line = evaluate.format_metrics("linear_probe", {
      "top1": 0.4562, "l2_strength": 1e-6, "chance_top1": 1 / 32, "tiny": 0.00012345,
      "test_examples": 320.0, "skipped/corrupt_record": 2.0, "big": 123456.7})
  assert line == ("linear_probe: top1 0.4562, l2_strength 1e-06, chance_top1 0.0312, "
                  "tiny 0.000123, test_examples 320, skipped/corrupt_record 2, big 1.23e+05")
  assert evaluate.format_figure(1e-3) == "0.001" and evaluate.format_figure(1e6) == "1e+06"


def test_majority_class_and_chance_baselines():
  train = np.array([0] * 7 + [1, 1, 2])  # class 0 is the train split's most frequent
  test = np.array([1, 2, 1, 2, 0, 1])  # ... and rare in test
  figures = linear_probe.baselines(train, test)
  assert figures == {"majority_class_top1": pytest.approx(1 / 6),
                     "chance_top1": pytest.approx(1 / 3)}
  assert figures["majority_class_top1"] < figures["chance_top1"]  # as a majority guess can be


def test_linear_probe_reports_named_baselines_and_the_strength(ctx, monkeypatch):
  """The whole evaluator on made-up features (no model): the metric names and values."""
  evaluator = evals.build(dict(evaluator="linear_probe", l2_strengths=(1e-6,)), ctx, "probe")
  rng = np.random.default_rng(0)

  def features(labels):
    centres = np.eye(3, 8) * 4
    return (centres[labels] + rng.normal(size=(len(labels), 8)) * 0.1).astype(np.float32), labels

  splits = {id(evaluator.train): np.array([0] * 60 + [1] * 20 + [2] * 20),
            id(evaluator.test): np.array([0] * 5 + [1] * 20 + [2] * 20)}
  monkeypatch.setattr(evaluator, "_features",
                      lambda source, params: (features(splits[id(source)]), {}))
  monkeypatch.setattr(evaluator.ctx, "place", lambda params: params)
  metrics = evaluator(None)
  assert "majority_top1" not in metrics
  assert metrics["majority_class_top1"] == pytest.approx(5 / 45)  # below chance, as it may be
  assert metrics["chance_top1"] == pytest.approx(1 / 3)
  assert metrics["top1"] == 1.0 and metrics["l2_strength"] == 1e-6
  assert "l2_strength 1e-06" in evaluate.format_metrics("linear_probe", metrics)
