"""Held-out reconstruction of an image tokenizer (the dVAE task): images -> codes -> pixels.

Each image's whole view at the tokenizer's size (Lanczos, as the training views) is encoded to
its argmax codes and decoded back; reported: mean squared error and PSNR in [0, 1] pixel units,
how many codebook entries the split uses and the perplexity of their distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from flava_jax.data import transforms
from flava_jax.data.examples import as_image_bytes
from flava_jax.data.preprocess import pick_one
from flava_jax.evals.features import EvalContext, TaskConfig, open_split


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "reconstruction"
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="image", split="test"))
  limit: int = 256  # images used (0: all)


class Evaluator:

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    if not hasattr(ctx.predict, "reconstruct"):
      raise ValueError(f"{where}: this model has no tokenizer to reconstruct images with")
    self.source = open_split(cfg.data, ("image",), f"{where}.data", ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self._outputs = lambda p, b: ctx.predict.reconstruct(p, b)

  def _row(self, index: int) -> dict[str, np.ndarray]:
    data = as_image_bytes(pick_one(self.source[index].get("image"), None))
    image = transforms.decode_rgb(data, self.ctx.max_pixels)
    size = self.ctx.predict.image_size
    return {"pixels": np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))}

  def __call__(self, params: Any) -> dict[str, float]:
    ctx = self.ctx
    out, skipped = ctx.map_split(self.count, self._row, self._outputs, ctx.place(params),
                                 self.cfg.batch_size, self.cfg.read_threads)
    mse = float(np.mean(out["squared_error"]))
    counts = np.bincount(out["codes"].ravel(), minlength=ctx.predict.codebook_size)
    p = counts / counts.sum()
    metrics = {"mse": mse, "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
               "codes_used": int((counts > 0).sum()),
               "code_perplexity": float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))),
               "examples": int(len(out["codes"]))}
    metrics.update({f"skipped/{k}": v for k, v in skipped.items()})
    return metrics
