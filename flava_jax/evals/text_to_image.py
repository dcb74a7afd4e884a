"""Text to image with the tri-modal model's image decoder, scored against the true images
(OPT's text-to-image generation; tasks/omni.py).

For each held-out record (the embedded spoken part's test split), the image decoder samples the
image's dVAE codes one at a time (top-k, models/omni_generate.sample_codes) from the cross-modal
outputs of
  text         the caption alone (image and audio left out of the cross-modal keys), and
  text_audio   the caption and its recording (the paper: the third modality helps),
and the frozen dVAE's decoder turns them into pixels. The image itself is never given. Scored
against the image's own codes (the dVAE's encoder on its view) and its pixels:
  code_accuracy_MODE   the share of the P codes sampled equal to the image's code at that place
  mse_MODE             mean squared error of the decoded image to the true view, [0, 1] pixels
  psnr_MODE            10 log10(1 / mse_MODE)
and, beside them, what the numbers mean:
  mse_roundtrip               the dVAE's own reconstruction of the true codes (what a perfect
                              code generator would score: the floor of mse_MODE)
  mse_other_image             the reconstruction of another held-out record's true codes (a
                              real image of the wrong scene)
  code_accuracy_frequent      always writing, at each place, the code most frequent there in the
                              baseline split's images (a generator that ignores its input)
  mse_frequent                the image of those codes
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax.data import transforms
from flava_jax.data.examples import as_image_bytes
from flava_jax.data.preprocess import pick_one
from flava_jax.evals.features import EvalContext, TaskConfig, open_split

MODES = {"text": (True, False, False), "text_audio": (True, False, True)}


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "text_to_image"
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="test",
      fields=dict(image="image", caption="caption", audio="audio")))
  # Images whose codes give the per-place most frequent code ({}: no such baseline).
  baseline_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="train", fields=dict(image="image")))
  baseline_limit: int = 1000  # baseline images used (0: all)
  limit: int = 100  # records used (0: all)
  modes: tuple = tuple(MODES)
  top_k: int = 32  # codes sampled among the k most likely (0: all)
  temperature: float = 1.0  # 0: greedy
  seed: int = 0  # the sampling's; the same seed gives the same images
  max_audio_seconds: float = 600.0

  def __post_init__(self):
    unknown = [m for m in self.modes if m not in MODES]
    if unknown:
      raise ValueError(f"modes={unknown} are not among {tuple(MODES)}")
    if self.top_k < 0 or self.temperature < 0:
      raise ValueError(f"top_k={self.top_k} and temperature={self.temperature} must be >= 0")


def code_accuracy(sampled: np.ndarray, true: np.ndarray) -> float:
  return float(np.mean(np.asarray(sampled) == np.asarray(true)))


def most_frequent_codes(codes: np.ndarray, vocab: int) -> np.ndarray:
  """[P] the most frequent code at each place of codes [N, P] (the lowest code on ties)."""
  counts = np.zeros((codes.shape[1], vocab), np.int64)
  np.add.at(counts, (np.arange(codes.shape[1])[None].repeat(len(codes), 0), codes), 1)
  return counts.argmax(axis=1)


def psnr(mse: float) -> float:
  return float(10 * np.log10(1.0 / max(mse, 1e-12)))


class Evaluator:
  """Draws each held-out caption's image (alone, and with its recording) and scores it."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    if ctx.load_frozen is None:
      raise ValueError(f"{where}: text to image needs the task's dVAE (a training workdir's, or "
                       "the run's own), which this model source does not give")
    self.source = open_split(cfg.data, ("image", "caption", "audio"), f"{where}.data",
                             ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self.baseline = (open_split(cfg.baseline_data, ("image",), f"{where}.baseline_data",
                                ctx.cache_dir) if cfg.baseline_data else None)
    self._frequent = None
    self._drawers = {}
    predict = ctx.predict
    self._true = lambda p, b: {"codes": predict.image_codes(p, b["dvae_pixels"])}
    self._pixels = lambda p, codes: predict.code_pixels(p, codes)

  def _view(self, value: Any) -> np.ndarray:
    image = transforms.decode_rgb(as_image_bytes(pick_one(value, None)), self.ctx.max_pixels)
    return transforms.eval_pixels(image, self.ctx.predict.dvae_size)

  def row(self, index: int) -> dict[str, np.ndarray]:
    record, ctx = self.source[index], self.ctx
    return dict(ctx.image_row(record.get("image")), dvae_pixels=self._view(record.get("image")),
                **ctx.text_row(record.get("caption"), self.cfg.text_length),
                **ctx.audio_row(record.get("audio"), self.cfg.max_audio_seconds))

  def drawer(self, mode: str):
    """One function per mode (map_split jits it once): ((params, frozen), batch) -> the sampled
    codes and their decoded image's squared error, and the record's view and true codes."""
    if mode not in self._drawers:
      cfg, predict, present = self.cfg, self.ctx.predict, MODES[mode]

      def draw(both, batch):
        params, frozen = both
        # One key per example (its index): an example draws the same image in any batch.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(cfg.seed), i))(
            jnp.maximum(batch["index"], 0))
        codes = predict.generate_codes(params, batch, present, keys, cfg.top_k,
                                       cfg.temperature)
        return {"sampled": codes, "view": batch["dvae_pixels"],
                "true": predict.image_codes(frozen, batch["dvae_pixels"]),
                **self._errors(frozen, batch["dvae_pixels"], codes)}

      self._drawers[mode] = draw
    return self._drawers[mode]

  def _errors(self, frozen: Any, dvae_pixels: jax.Array, codes: jax.Array
              ) -> dict[str, jax.Array]:
    target = dvae_pixels.astype(jnp.float32) / 255.0
    image = self._pixels(frozen, codes).astype(jnp.float32)
    return {"squared_error": jnp.mean(jnp.square(image - target), axis=(1, 2, 3))}

  def _baseline_codes(self, frozen: Any) -> np.ndarray | None:
    """The per-place most frequent code of the baseline images (computed once, kept)."""
    if self._frequent is None and self.baseline is not None:
      count = (len(self.baseline) if not self.cfg.baseline_limit
               else min(self.cfg.baseline_limit, len(self.baseline)))
      out, _ = self.ctx.map_split(
          count, lambda i: {"dvae_pixels": self._view(self.baseline[i].get("image"))},
          self._true, frozen, self.cfg.batch_size, self.cfg.read_threads)
      self._frequent = most_frequent_codes(out["codes"], self.ctx.predict.code_vocab)
    return self._frequent

  def _fixed_codes(self, frozen: Any, views: np.ndarray, codes: np.ndarray) -> float:
    """The mean squared error of the images of given codes [N, P] to views [N, S, S, 3]."""
    out, _ = self.ctx.map_split(
        len(codes), lambda i: {"dvae_pixels": views[i], "codes": codes[i]},
        self._fixed, frozen, self.cfg.batch_size, self.cfg.read_threads)
    return float(np.mean(out["squared_error"]))

  def _fixed(self, frozen, batch):
    return self._errors(frozen, batch["dvae_pixels"], batch["codes"])

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    params, frozen = ctx.place(params), ctx.frozen()
    if "decoder" not in frozen:
      raise ValueError("text_to_image: the task's dVAE has no decoder (an encoder-only "
                       "codebook): train one with configs/dvae.py and set init.dvae_from")
    metrics = {}
    true = views = None
    for mode in cfg.modes:
      out, skipped = ctx.map_split(self.count, self.row, self.drawer(mode), (params, frozen),
                                   cfg.batch_size, cfg.read_threads)
      if true is None:  # the same records in every mode: their views and codes once
        views, true = out["view"], out["true"]
        metrics.update(records=float(len(true)),
                       **{f"skipped/{k}": float(v) for k, v in skipped.items()})
      mse = float(np.mean(out["squared_error"]))
      metrics.update({f"code_accuracy_{mode}": code_accuracy(out["sampled"], true),
                      f"mse_{mode}": mse, f"psnr_{mode}": psnr(mse)})
    if true is not None and len(true):
      metrics["mse_roundtrip"] = self._fixed_codes(frozen, views, true)
      metrics["mse_other_image"] = self._fixed_codes(frozen, views, np.roll(true, 1, axis=0))
      frequent = self._baseline_codes(frozen)
      if frequent is not None:
        constant = np.broadcast_to(frequent, true.shape)
        metrics["code_accuracy_frequent"] = code_accuracy(constant, true)
        metrics["mse_frequent"] = self._fixed_codes(frozen, views, np.array(constant))
    return metrics
