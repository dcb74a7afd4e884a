"""Zero-shot audio<->text retrieval over a whole split (the audio tasks' held-out figure).

Each record holds one recording and its caption (the embedded spoken part's test split: 256
held-out captions, each spoken once). Recordings are decoded to 16 kHz mono, cut or padded to
the model's audio length (the start is kept), and embedded with the audio projection; captions
with the text projection; both are scored by cosine similarity over the whole split:
  audio->text R@k: the recording's caption is among the k best-scoring captions;
  text->audio R@k: the caption's recording is among the k best-scoring recordings.
Ties count against the right answer only when a candidate scores strictly higher (as in
retrieval.py). `chance_r1` is 1 / the number of recordings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flava_jax.evals.features import EvalContext, TaskConfig, open_split
from flava_jax.evals.retrieval import retrieval_metrics, similarities, split_captions


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "audio_retrieval"
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="test",
      fields=dict(audio="audio", caption="caption")))
  ks: tuple = (1, 5, 10)
  limit: int = 0  # recordings used (0: all)
  max_audio_seconds: float = 600.0  # longer recordings are skipped (audio_too_long)


class Evaluator:
  """Embeds a split's recordings and captions and scores retrieval both ways."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("audio", "caption"), f"{where}.data", ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self.texts, self.text_audio = split_captions(self.source, self.count, ctx.max_text_bytes,
                                                 cfg.read_threads, f"{where}.data")

  def audio_row(self, index: int) -> dict[str, np.ndarray]:
    return self.ctx.audio_row(self.source[index].get("audio"), self.cfg.max_audio_seconds)

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    params = ctx.place(params)
    length = cfg.text_length or ctx.text_length
    recordings, skipped = ctx.map_split(self.count, self.audio_row, ctx.predict.audio_features,
                                        params, cfg.batch_size, cfg.read_threads)
    texts, text_skips = ctx.map_split(
        len(self.texts), lambda t: ctx.text_row(self.texts[t], length), ctx.text_features,
        params, cfg.batch_size, cfg.read_threads)
    skipped.update(text_skips)
    similarity, text_audio, kept = similarities(recordings, texts, self.text_audio, self.count,
                                                skipped, "caption_of_skipped_audio")
    found = retrieval_metrics(similarity, text_audio[kept], cfg.ks)
    metrics = {}
    for k in cfg.ks:
      metrics[f"a2t_r{k}"] = found[f"i2t_r{k}"]
      metrics[f"t2a_r{k}"] = found[f"t2i_r{k}"]
    metrics.update(recordings=float(len(recordings["index"])), texts=float(kept.sum()),
                   chance_r1=1.0 / max(len(recordings["index"]), 1))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
