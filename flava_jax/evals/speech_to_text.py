"""Speech to text with the tri-modal model's text decoder, scored by word error rate (OPT's
audio-to-text generation; tasks/omni.py).

For each held-out record (the embedded spoken part's test split: captions spoken by eSpeak NG),
the text decoder writes a caption greedily from the cross-modal outputs of
  audio         the recording alone (text and image left out of the cross-modal keys), and
  audio_image   the recording and its image (the paper: the image lowers the WER further).
The caption itself is never given (the text encoder reads an empty text, which is left out too).
WER (jiwer: substitutions + deletions + insertions over the reference words, the whole split at
once) compares the written captions with the true ones, lowercased with punctuation spaced out
as the tokenizer does. Baselines on the same references: `wer_empty` (writing nothing: 1.0) and
`wer_best_constant`, the lowest WER any one training caption reaches when written for every
record (the best a model ignoring its input could do with the training captions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from flava_jax.data.examples import Skip, as_text
from flava_jax.evals.captioning import decode_caption
from flava_jax.evals.features import EvalContext, TaskConfig, open_split

MODES = {"audio": (False, False, True), "audio_image": (False, True, True)}


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "speech_to_text"
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="test",
      fields=dict(image="image", caption="caption", audio="audio")))
  # Where the constant baseline's candidates come from ({} : no constant baseline).
  baseline_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="train", fields=dict(caption="caption")))
  limit: int = 100  # records used (0: all)
  modes: tuple = tuple(MODES)
  max_length: int = 0  # tokens written at most ([SEP] included); 0: the text length - 1
  max_audio_seconds: float = 600.0
  examples: int = 3  # (reference, transcription) pairs printed with the figures

  def __post_init__(self):
    unknown = [m for m in self.modes if m not in MODES]
    if unknown:
      raise ValueError(f"modes={unknown} are not among {tuple(MODES)}")


def normalise(text: str, tokenizer: Any) -> str:
  """A caption as the decoder could write it: tokenised and decoded (lowercase, punctuation
  split off, unknown pieces kept as [UNK])."""
  ids, mask, _ = tokenizer.encode(text, 512)
  return decode_caption(tokenizer, ids[1:int(mask.sum())])


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
  import jiwer  # pylint: disable=import-outside-toplevel
  return float(jiwer.wer(references, hypotheses))


def best_constant(references: list[str], candidates: list[str]) -> tuple[float, str]:
  """(the lowest corpus WER of one candidate written for every reference, that candidate)."""
  import jiwer  # pylint: disable=import-outside-toplevel
  best = (float("inf"), "")
  for candidate in sorted(set(candidates)):
    if candidate:
      best = min(best, (float(jiwer.wer(references, [candidate] * len(references))), candidate))
  return best


class Evaluator:
  """Transcribes a split's recordings (alone, and with their images) and scores the WER."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("image", "caption", "audio"), f"{where}.data",
                             ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self.length = cfg.text_length or ctx.text_length
    self.max_length = cfg.max_length or self.length - 1
    if self.max_length < 1:
      raise ValueError(f"{where}.max_length={cfg.max_length} leaves nothing to write")
    self.baseline = (open_split(cfg.baseline_data, ("caption",), f"{where}.baseline_data",
                                ctx.cache_dir) if cfg.baseline_data else None)
    self._constants = None
    self._writers = {}

  def constants(self) -> list[str]:
    """The baseline split's captions, normalised: read on first use (not at start-up) and kept
    for later evaluations."""
    if self._constants is None:
      self._constants = []
      for i in range(len(self.baseline) if self.baseline is not None else 0):
        try:
          text = as_text(self.baseline[i].get("caption"), self.ctx.max_text_bytes)
        except Skip:
          continue
        self._constants.append(normalise(text, self.ctx.tokenizer))
    return self._constants

  def row(self, index: int) -> dict[str, np.ndarray]:
    record, ctx = self.source[index], self.ctx
    ids, attention, _ = ctx.tokenizer.encode("", self.length)  # the caption is never read
    return dict(ctx.image_row(record.get("image")), input_ids=ids, attention_mask=attention,
                **ctx.audio_row(record.get("audio"), self.cfg.max_audio_seconds))

  def writer(self, mode: str):
    if mode not in self._writers:  # one function per mode: map_split jits it once
      predict, tok, present = self.ctx.predict, self.ctx.tokenizer, MODES[mode]
      self._writers[mode] = lambda p, b: {"tokens": predict.transcribe(
          p, b, present, self.max_length, tok.cls_id, tok.sep_id)}
    return self._writers[mode]

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg, tok = self.ctx, self.cfg, self.ctx.tokenizer
    params = ctx.place(params)
    metrics = {}
    references = None
    for mode in cfg.modes:
      out, skipped = ctx.map_split(self.count, self.row, self.writer(mode), params,
                                   cfg.batch_size, cfg.read_threads)
      if references is None:
        references = [normalise(as_text(self.source[int(i)].get("caption"),
                                        ctx.max_text_bytes), tok) for i in out["index"]]
        metrics.update(records=float(len(references)),
                       **{f"skipped/{k}": float(v) for k, v in skipped.items()})
      hypotheses = [decode_caption(tok, t) for t in out["tokens"]]
      metrics[f"wer_{mode}"] = word_error_rate(references, hypotheses)
      for n, (ref, hyp) in enumerate(zip(references[:cfg.examples], hypotheses)):
        if jax.process_index() == 0:
          print(f"speech_to_text {mode} #{n}: said {ref!r} -> wrote {hyp!r}", flush=True)
    if references:
      metrics["wer_empty"] = word_error_rate(references, [""] * len(references))
      if self.constants():
        metrics["wer_best_constant"], constant = best_constant(references, self.constants())
        if jax.process_index() == 0:
          print(f"speech_to_text: the best constant transcription is {constant!r}", flush=True)
    return metrics
