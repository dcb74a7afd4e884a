"""Zero-shot image<->text retrieval over a whole split (FLAVA's COCO and Flickr30k figures).

Each record holds one image and one or several captions (COCO and Flickr30k have five). Images
and captions are embedded with the contrastive projections (sharded, gathered once) and scored by
cosine similarity over the whole split:
  image->text R@k: some caption of the image is among the k best-scoring captions;
  text->image R@k: the caption's image is among the k best-scoring images.
A candidate outranks the right answer only when it scores strictly higher.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

import numpy as np

from flava_jax.data.examples import Skip, as_text
from flava_jax.evals.features import EvalContext, TaskConfig, open_split


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "retrieval"
  # The split: image + "caption" (a string or a list of strings), e.g. COCO 5K test with
  # fields.caption="captions/text", or the embedded corpus's five-caption retrieval split.
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="retrieval", split="test",
      fields=dict(image="image", caption="captions")))
  ks: tuple = (1, 5, 10)
  limit: int = 0  # images used (0: all)


def retrieval_metrics(similarity: np.ndarray, text_image: np.ndarray | None = None,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways from a [images, texts] similarity matrix.

  text_image[t] is the image caption t describes (default: caption t describes image t).
  Images without captions count only as text->image candidates.
  """
  similarity = np.asarray(similarity, np.float64)
  num_images, num_texts = similarity.shape
  text_image = np.arange(num_texts) if text_image is None else np.asarray(text_image)
  right = similarity[text_image, np.arange(num_texts)]  # [T] score of each caption's image
  # text->image: images scoring strictly above the caption's own image.
  t2i_rank = (similarity > right[None, :]).sum(0)
  # image->text: captions scoring strictly above the image's best-scoring own caption.
  best_own = np.full(num_images, -np.inf)
  np.maximum.at(best_own, text_image, right)
  has_text = np.isfinite(best_own)
  i2t_rank = (similarity[has_text] > best_own[has_text, None]).sum(1)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
  return out


def _captions(value: Any, max_bytes: int) -> list[str]:
  """A caption field (a string or a list of them) -> the usable captions."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  values = value if isinstance(value, (list, tuple)) else [value]
  out = []
  for v in values:
    try:
      out.append(as_text(v, max_bytes))
    except Skip:
      pass
  return out


class Evaluator:
  """Embeds a split's images and captions and scores retrieval both ways."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("image", "caption"), f"{where}.data", ctx.cache_dir)
    count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    # Every process reads every caption (small next to the images, and the ranking needs all).
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.read_threads)) as pool:
      captions = list(pool.map(
          lambda i: _captions(self.source[i].get("caption"), ctx.max_text_bytes), range(count)))
    self.count = count
    self.texts = [c for cs in captions for c in cs]
    self.text_image = np.asarray([i for i, cs in enumerate(captions) for _ in cs], np.int64)
    if not self.texts:
      raise ValueError(f"{where}.data: no usable caption in {count} records")

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    params = ctx.place(params)
    length = cfg.text_length or ctx.text_length
    images, skipped = ctx.map_split(
        self.count, lambda i: ctx.image_row(self.source[i].get("image")), ctx.image_features,
        params, cfg.batch_size, cfg.read_threads)
    texts, text_skips = ctx.map_split(
        len(self.texts), lambda t: ctx.text_row(self.texts[t], length), ctx.text_features,
        params, cfg.batch_size, cfg.read_threads)
    skipped.update(text_skips)
    # Captions of skipped images have no right answer: leave them out (and count them).
    position = np.full(self.count, -1)
    position[images["index"]] = np.arange(len(images["index"]))
    text_image = position[self.text_image[texts["index"]]]
    kept = text_image >= 0
    if not kept.all():
      skipped["caption_of_skipped_image"] += int((~kept).sum())
    similarity = images["embedding"] @ texts["embedding"][kept].T
    metrics = retrieval_metrics(similarity, text_image[kept], cfg.ks)
    metrics.update(images=float(len(images["index"])), texts=float(kept.sum()),
                   chance_t2i_r1=1.0 / max(len(images["index"]), 1))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
