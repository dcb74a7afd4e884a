"""Retrieval among text, images and audio with the tri-modal model's match classifier (OPT's
retrieval tasks; tasks/omni.py).

Each record holds an image, its caption and the caption's recording (the embedded spoken part's
test split). The three encoders run once per record; then every (query, candidate) pair goes
through the cross-modal stack and the 5-way classifier (models/omni.MATCH_CLASSES), and the pair's
score is the log-probability that the two sides belong together: the log of the summed
probabilities of the classes in which the query's modalities and the candidate's are matched.

  text_image    captions x images, no audio: image->text (i2t) and text->image (t2i);
                classes "all" + "text_image"
  text_audio    captions x recordings, no image: t2a and a2t; classes "all" + "text_audio"
  ta2i          caption + its recording -> images (the paper's text+audio->image); "all"
  ia2t          image + its recording -> captions; "all"
  ti2a          caption + its image -> recordings; "all"
The last three are the "with the extra modality" forms of t2i, i2t and t2a. The classifier was
trained with all three modalities present; the two-modality forms leave the third out of the
cross-modal keys (the modality-level masking trains the stack on such inputs).

Costs grow with the square of `limit` (records used; 100: 10,000 pairs per matrix).
R@k counts the query's own counterpart among its k best candidates; `chance_r1` = 1 / records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flava_jax.evals.features import EvalContext, TaskConfig, open_split
from flava_jax.evals.retrieval import retrieval_metrics
from flava_jax.models.omni import MATCH_CLASSES

# matrix -> (where each modality comes from: "row" the query's record, "column" the candidate's,
# None: absent; the classes whose probabilities add up to the pair's score)
MATRICES = {
    "text_image": (dict(text="row", image="column", audio=None), ("all", "text_image")),
    "text_audio": (dict(text="row", image=None, audio="column"), ("all", "text_audio")),
    "ta2i": (dict(text="row", image="column", audio="row"), ("all",)),
    "ia2t": (dict(text="column", image="row", audio="row"), ("all",)),
    "ti2a": (dict(text="row", image="row", audio="column"), ("all",)),
}
STATES = {"text": ("text", "attention"), "image": ("image",), "audio": ("audio", "frames")}


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "omni_retrieval"
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="spoken", split="test",
      fields=dict(image="image", caption="caption", audio="audio")))
  ks: tuple = (1, 5, 10)
  limit: int = 100  # records used (0: all): pairs grow with its square
  matrices: tuple = tuple(MATRICES)
  max_audio_seconds: float = 600.0

  def __post_init__(self):
    unknown = [m for m in self.matrices if m not in MATRICES]
    if unknown:
      raise ValueError(f"matrices={unknown} are not among {tuple(MATRICES)}")


def pair_scores(logits: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
  """log(sum of the softmax probabilities of `classes`) per row of [N, 5] logits."""
  logits = logits.astype(np.float64)
  log_p = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  picked = log_p[:, [MATCH_CLASSES.index(c) for c in classes]]
  return np.logaddexp.reduce(picked, axis=-1)


class Evaluator:
  """Encodes a split's records once, scores every pair of each matrix, reports R@k."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("image", "caption", "audio"), f"{where}.data",
                             ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self._scorers = {}

  def row(self, index: int) -> dict[str, np.ndarray]:
    record, ctx = self.source[index], self.ctx
    text = ctx.text_row(record.get("caption"), self.cfg.text_length or ctx.text_length)
    return dict(ctx.image_row(record.get("image")), input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
                **ctx.audio_row(record.get("audio"), self.cfg.max_audio_seconds))

  def scorer(self, present: tuple[bool, bool, bool]):
    if present not in self._scorers:  # one function per pattern: map_split jits it once
      predict = self.ctx.predict
      self._scorers[present] = lambda p, b: {
          "logits": predict.match_from_states(p, b, present)}
    return self._scorers[present]

  def matrix(self, params: Any, states: dict[str, np.ndarray], name: str) -> np.ndarray:
    """[queries, candidates] pair scores of one matrix."""
    sides, classes = MATRICES[name]
    n = len(states["index"])
    present = tuple(sides[m] is not None for m in ("text", "image", "audio"))

    def pair(k: int) -> dict[str, np.ndarray]:
      query, candidate = divmod(k, n)
      out = {}
      for modality, keys in STATES.items():
        source = candidate if sides[modality] == "column" else query
        for key in keys:  # an absent modality: the query's states, left out of the keys
          out[key] = states[key][source]
      return out

    logits, _ = self.ctx.map_split(n * n, pair, self.scorer(present), params,
                                   self.cfg.batch_size, self.cfg.read_threads)
    return pair_scores(logits["logits"], classes).reshape(n, n)

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    params = ctx.place(params)
    states, skipped = ctx.map_split(self.count, self.row, ctx.predict.unimodal, params,
                                    cfg.batch_size, cfg.read_threads)
    n = len(states["index"])
    metrics = {"records": float(n), "chance_r1": 1.0 / max(n, 1)}
    truth = np.arange(n)
    for name in cfg.matrices:
      scores = self.matrix(params, states, name)  # rows: queries of the matrix's "row" side
      found = retrieval_metrics(scores.T, truth, cfg.ks)  # i2t_*: columns -> rows; t2i_*: rows
      forward, backward = {"text_image": ("t2i", "i2t"), "text_audio": ("t2a", "a2t"),
                           "ta2i": ("ta2i", None), "ia2t": ("ia2t", None),
                           "ti2a": ("ti2a", None)}[name]
      for k in cfg.ks:
        metrics[f"{forward}_r{k}"] = found[f"t2i_r{k}"]
        if backward:
          metrics[f"{backward}_r{k}"] = found[f"i2t_r{k}"]
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
