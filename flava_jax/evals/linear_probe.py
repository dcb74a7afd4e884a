"""Linear probe: logistic regression on frozen final-LayerNorm [CLS] features (FLAVA's vision
tasks use h_CLS_I; h_CLS_T and h_CLS_M work the same way).

Features of the train, validation and test splits are computed sharded and gathered once; an
L-BFGS logistic regression (scikit-learn) is fitted on train for each L2 strength of the sweep
(lambda = 1/C, 1e-6 .. 1e6 by default), the strength with the best validation accuracy is refitted
on train + validation, and its test accuracy is the figure. Without a validation split, a fixed
random share of the train split is held out for the sweep.

With features "cross_modal" (the tri-modal model, tasks/omni.py), the feature is the cross-modal
stack's [CLS] output given only some of the modalities (text, image, audio): one probe per subset
in `modalities` ("image", "text_audio", ...), its metrics named "SUBSET/top1" and so on (the
paper: each added modality helps). The records need all three fields and a label.

Metrics:
    top1                 test accuracy of the probe refitted on train + validation
    validation_top1      the best validation accuracy of the sweep
    l2_strength          the L2 strength (lambda = 1/C) that gave it
    majority_class_top1  test accuracy of always answering the most frequent class of the train
                         (+ validation) labels: a baseline that depends on the test split's class
                         balance, below chance_top1 when that class is rarer in test than average
    chance_top1          1 / the number of classes in the train (+ validation) labels: a uniform
                         random guess's expected accuracy
    train_examples, test_examples, skipped/REASON  counts
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from flava_jax.evals.features import EvalContext, TaskConfig, open_split, split_indices


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "linear_probe"
  # image (h_CLS_I) | text (h_CLS_T) | multimodal (h_CLS_M) | cross_modal (the omni model's)
  features: str = "image"
  # cross_modal: the subsets of text, image and audio given, each joined by "_" (a metric name).
  modalities: tuple = ("text", "image", "audio", "text_image", "text_audio", "image_audio",
                       "text_image_audio")
  train_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="image", split="train"))
  # A split of its own; {} or source "": a fixed random validation_fraction of train instead.
  validation_data: dict = dataclasses.field(default_factory=dict)
  test_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="image", split="test"))
  validation_fraction: float = 0.2
  l2_strengths: tuple = tuple(10.0 ** e for e in range(-6, 7))
  max_iterations: int = 1000
  # BLAS/OpenMP threads per fit. 1: small fits ran ~100x slower with threads fighting over two
  # cores (and over XLA's); raise it for large feature sets (ImageNet) on big hosts.
  fit_threads: int = 1
  train_limit: int = 0  # examples used per split (0: all)
  seed: int = 0


_NEEDED = {"image": ("image", "label"), "text": ("text", "label"),
           "multimodal": ("image", "text", "label"),
           "cross_modal": ("image", "text", "audio", "label")}
# The predict function each kind of feature calls.
_CALLS = {"image": "image_features", "text": "text_features",
          "multimodal": "multimodal_features", "cross_modal": "cross_modal_cls"}
MODALITIES = ("text", "image", "audio")


def modality_subset(name: str, where: str) -> tuple[bool, bool, bool]:
  """"text_audio" -> (True, False, True): which of (text, image, audio) are given."""
  parts = name.split("_")
  unknown = [p for p in parts if p not in MODALITIES]
  if unknown or len(set(parts)) != len(parts):
    raise ValueError(f"{where}={name!r}: join distinct names of {MODALITIES} with '_'")
  return tuple(m in parts for m in MODALITIES)


def fit_and_score(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], strengths: tuple[float, ...],
                  max_iterations: int, threads: int = 1) -> dict[str, float]:
  """The sweep on validation, the refit on train + validation, and test accuracy."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel

  def fit(x, y, strength):
    model = LogisticRegression(C=1.0 / strength, max_iter=max_iterations)
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
      warnings.simplefilter("ignore")  # an unconverged fit at an extreme strength is expected
      return model.fit(x, y)

  scores = [float(fit(*train, s).score(*validation)) for s in strengths]
  best = int(np.argmax(scores))
  final = fit(np.concatenate([train[0], validation[0]]), np.concatenate([train[1], validation[1]]),
              strengths[best])
  return {"top1": float(final.score(*test)), "validation_top1": scores[best],
          "l2_strength": float(strengths[best])}


def baselines(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
  """What a probe that learned nothing scores: majority_class_top1 (test accuracy of always
  answering the train labels' most frequent class) and chance_top1 (1 / train classes)."""
  classes, counts = np.unique(train_labels, return_counts=True)
  majority = classes[np.argmax(counts)]
  return {"majority_class_top1": float((np.asarray(test_labels) == majority).mean()),
          "chance_top1": 1.0 / len(classes)}


class Evaluator:

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    if cfg.features not in _NEEDED:
      raise ValueError(f"{where}.features={cfg.features!r}: use one of {sorted(_NEEDED)}")
    if not 0.0 < cfg.validation_fraction < 1.0:
      raise ValueError(f"{where}.validation_fraction={cfg.validation_fraction} must be in (0, 1)")
    if cfg.fit_threads < 1:
      raise ValueError(f"{where}.fit_threads={cfg.fit_threads} must be >= 1")
    if not cfg.l2_strengths or min(cfg.l2_strengths) <= 0:
      raise ValueError(f"{where}.l2_strengths must be positive numbers")
    if not hasattr(ctx.predict, _CALLS[cfg.features]):
      raise ValueError(f"{where}.features={cfg.features!r} calls {_CALLS[cfg.features]}, which "
                       "this model's task does not provide")
    self.subsets = ()
    if cfg.features == "cross_modal":
      if not cfg.modalities:
        raise ValueError(f"{where}.modalities names no subset of {MODALITIES}")
      self.subsets = tuple(modality_subset(m, f"{where}.modalities") for m in cfg.modalities)
    self.cfg, self.ctx = cfg, ctx
    needed = _NEEDED[cfg.features]
    self.train = open_split(cfg.train_data, needed, f"{where}.train_data", ctx.cache_dir)
    self.validation = (open_split(cfg.validation_data, needed, f"{where}.validation_data",
                                  ctx.cache_dir) if cfg.validation_data.get("source") else None)
    self.test = open_split(cfg.test_data, needed, f"{where}.test_data", ctx.cache_dir)
    if cfg.features == "cross_modal":  # [B, subsets, D]
      subsets, predict = self.subsets, ctx.predict
      self._outputs = lambda p, b: {"cls": predict.cross_modal_cls(p, b, subsets),
                                    "label": b["label"]}
    else:
      features_fn = {"image": ctx.image_features, "text": ctx.text_features,
                     "multimodal": ctx.multimodal_features}[cfg.features]
      self._outputs = lambda p, b: {"cls": features_fn(p, b)["cls"], "label": b["label"]}

  def _features(self, source, params: Any) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    ctx, cfg = self.ctx, self.cfg
    length = cfg.text_length or ctx.text_length

    def prepare(index):
      example = source[index]
      row = {}
      if cfg.features in ("image", "multimodal", "cross_modal"):
        row.update(ctx.image_row(example.get("image")))
      if cfg.features in ("text", "multimodal", "cross_modal"):
        row.update(ctx.text_row(example.get("text"), length))
      if cfg.features == "cross_modal":
        row.update(ctx.audio_row(example.get("audio")))
      label = example.get("label")
      row["label"] = np.int32(-1 if label is None else label)
      return row

    count = len(source) if not cfg.train_limit else min(cfg.train_limit, len(source))
    out, skipped = ctx.map_split(count, prepare, self._outputs, params, cfg.batch_size,
                                 cfg.read_threads)
    keep = out["label"] >= 0
    if (~keep).any():
      skipped["missing_label"] += int((~keep).sum())
    return (out["cls"][keep], out["label"][keep]), skipped

  def __call__(self, params: Any) -> dict[str, float]:
    cfg = self.cfg
    params = self.ctx.place(params)
    train, skipped = self._features(self.train, params)
    if self.validation is not None:
      validation, more = self._features(self.validation, params)
      skipped.update(more)
    else:
      fit_rows, held_rows = split_indices(len(train[1]), cfg.validation_fraction, cfg.seed)
      validation = (train[0][held_rows], train[1][held_rows])
      train = (train[0][fit_rows], train[1][fit_rows])
    test, more = self._features(self.test, params)
    skipped.update(more)
    if not self.subsets:
      metrics = self._probe(train, validation, test)
    else:  # one probe per subset of the modalities
      metrics = {}
      for k, name in enumerate(cfg.modalities):
        pick = lambda split: (split[0][:, k], split[1])  # noqa: E731  pylint: disable=W0640
        metrics.update({f"{name}/{m}": v for m, v in
                        self._probe(pick(train), pick(validation), pick(test)).items()})
    metrics.update(baselines(np.concatenate([train[1], validation[1]]), test[1]))
    metrics.update(train_examples=float(len(train[1])), test_examples=float(len(test[1])))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics

  def _probe(self, train, validation, test) -> dict[str, float]:
    cfg = self.cfg
    return fit_and_score(train, validation, test, tuple(cfg.l2_strengths), cfg.max_iterations,
                         cfg.fit_threads)
