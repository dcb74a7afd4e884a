"""Zero-shot image classification: class names x prompt templates -> one text embedding per class.

Every (template, class name) prompt is embedded with the text encoder and its projection; the
prompts of a class are averaged and renormalised (a prompt ensemble). An image's class is the one
whose embedding is nearest its own; top-1 and top-5 accuracy over the split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flava_jax.data import embedded
from flava_jax.evals.features import EvalContext, TaskConfig, load_names, open_split

# Our own prompt ensemble: short, generic photo descriptions.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image with a {}.",
                     "a drawing of a {}.", "a {} in the picture.")


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "zero_shot"
  # The split: image + integer label (ImageNet: source="tfds", name="imagenet2012",
  # split="validation").
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="image", split="test"))
  # "embedded" (the embedded corpus's 32 names), "tfds" (the dataset's label names) or a file:
  # a JSON list or one name per line, in label order.
  class_names: str = "embedded"
  templates: tuple = DEFAULT_TEMPLATES
  ks: tuple = (1, 5)
  limit: int = 0  # images used (0: all)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Share of rows whose label is among the k highest logits (ties broken by class order)."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float((top == labels[:, None]).any(1).mean())


class Evaluator:

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    if not cfg.templates or not all("{}" in t for t in cfg.templates):
      raise ValueError(f"{where}.templates: each template needs a '{{}}' for the class name")
    self.source = open_split(cfg.data, ("image", "label"), f"{where}.data", ctx.cache_dir)
    self.class_names = load_names(cfg.class_names, embedded.class_names, dict(cfg.data), "label",
                                  f"{where}.class_names")
    self.prompts = [t.format(name) for name in self.class_names for t in cfg.templates]
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self._prompt_row = lambda t: ctx.text_row(self.prompts[t], cfg.text_length or ctx.text_length)
    self._image_outputs = lambda p, b: dict(ctx.image_features(p, b), label=b["label"])

  def _image_row(self, index: int) -> dict[str, np.ndarray]:
    example = self.source[index]
    row = self.ctx.image_row(example.get("image"))
    label = example.get("label")
    row["label"] = np.int32(-1 if label is None else label)
    return row

  def class_embeddings(self, params: Any) -> np.ndarray:
    """[classes, projection] unit-norm prompt-ensemble embeddings."""
    ctx, cfg = self.ctx, self.cfg
    texts, skipped = ctx.map_split(len(self.prompts), self._prompt_row, ctx.text_features, params,
                                   cfg.batch_size, cfg.read_threads)
    if skipped:
      raise ValueError(f"prompts could not be tokenised: {dict(skipped)}")
    per_class = texts["embedding"].reshape(len(self.class_names), len(cfg.templates), -1)
    mean = per_class.mean(1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    params = ctx.place(params)
    classes = self.class_embeddings(params)
    images, skipped = ctx.map_split(
        self.count, self._image_row, self._image_outputs, params, cfg.batch_size, cfg.read_threads)
    labels = images["label"]
    bad = (labels < 0) | (labels >= len(self.class_names))
    if bad.any():
      skipped["label_out_of_range"] += int(bad.sum())
    logits = images["embedding"][~bad] @ classes.T
    metrics = {f"top{k}": top_k_accuracy(logits, labels[~bad], k) for k in cfg.ks}
    metrics.update(images=float((~bad).sum()), classes=float(len(self.class_names)),
                   chance_top1=1.0 / len(self.class_names))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
