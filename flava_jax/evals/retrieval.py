"""Zero-shot image<->text retrieval over a whole split (FLAVA's COCO and Flickr30k figures).

Each record holds one image and one or several captions (COCO and Flickr30k have five). Images
and captions are embedded with the contrastive projections (sharded, gathered once) and scored by
cosine similarity over the whole split:
  image->text R@k: some caption of the image is among the k best-scoring captions;
  text->image R@k: the caption's image is among the k best-scoring images.
A candidate outranks the right answer only when it scores strictly higher.

BLIP's way (rerank_k > 0, a model with an ITM head): the contrastive similarity picks each
query's top k candidates, and the ITM head re-scores those k pairs; the rest keep their
contrastive order below them. rerank_score="itm" ranks the k by the ITM match probability (what
k = all turns into ranking by ITM alone); "itm+itc" by the ITM head's match logit plus the
similarity, as the reference's retrieval evaluation adds them. Both figures are reported: the
contrastive ones as i2t_r1..., the re-ranked ones as rerank_i2t_r1... The re-ranking decodes the
split's images once more and keeps those that take part in a pair in host memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from flava_jax.data.examples import Skip, as_text
from flava_jax.evals.features import EvalContext, TaskConfig, open_split
from flava_jax.parse import check_choice

RERANK_SCORES = ("itm", "itm+itc")
_OUTSIDE = 1e6  # candidates outside a query's top k score their similarity minus this


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
  rerank_k: int = 0  # ITM re-scores each query's top k (0: contrastive only; -1: every pair)
  rerank_score: str = "itm"  # itm | itm+itc (see the module's docstring)


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


def split_captions(source: Any, count: int, max_text_bytes: int, threads: int, where: str
                   ) -> tuple[list[str], np.ndarray]:
  """(every usable caption of records 0..count-1, the record each belongs to). Every process
  reads every caption (small next to the images or recordings; the ranking needs all)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    captions = list(pool.map(lambda i: _captions(source[i].get("caption"), max_text_bytes),
                             range(count)))
  texts = [c for cs in captions for c in cs]
  if not texts:
    raise ValueError(f"{where}: no usable caption in {count} records")
  return texts, np.asarray([i for i, cs in enumerate(captions) for _ in cs], np.int64)


def similarities(items: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                 text_item: np.ndarray, count: int, skipped: Any, reason: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(cosine similarity [kept items, kept texts], each kept text's item row, which texts were
  kept) from map_split outputs. Texts whose record (image, recording) was skipped have no right
  answer: they are left out and counted in `skipped` under `reason`."""
  position = np.full(count, -1)
  position[items["index"]] = np.arange(len(items["index"]))
  text_item = position[text_item[texts["index"]]]
  kept = text_item >= 0
  if not kept.all():
    skipped[reason] += int((~kept).sum())
  return items["embedding"] @ texts["embedding"][kept].T, text_item, kept


class Evaluator:
  """Embeds a split's images and captions and scores retrieval both ways."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("image", "caption"), f"{where}.data", ctx.cache_dir)
    self.count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    self.texts, self.text_image = split_captions(self.source, self.count, ctx.max_text_bytes,
                                                 cfg.read_threads, f"{where}.data")
    check_choice(f"{where}.rerank_score", cfg.rerank_score, RERANK_SCORES)
    if cfg.rerank_k < -1:
      raise ValueError(f"{where}.rerank_k={cfg.rerank_k}: give k > 0, 0 (none) or -1 (all)")
    if cfg.rerank_k and not hasattr(ctx.predict, "itm_logits"):
      raise ValueError(f"{where}.rerank_k={cfg.rerank_k}: this model has no ITM head to re-rank "
                       "with (BLIP has)")
    self._itm = lambda p, b: {"logits": ctx.predict.itm_logits(p, b)}

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
    similarity, text_image, kept = similarities(images, texts, self.text_image, self.count,
                                                skipped, "caption_of_skipped_image")
    metrics = retrieval_metrics(similarity, text_image[kept], cfg.ks)
    metrics.update(images=float(len(images["index"])), texts=float(kept.sum()),
                   chance_t2i_r1=1.0 / max(len(images["index"]), 1))
    if cfg.rerank_k:
      reranked, rerank_skips = self.rerank(params, similarity, images["index"],
                                           texts["index"][kept], text_image[kept], length)
      metrics.update({f"rerank_{k}": v for k, v in reranked.items()})
      skipped.update(rerank_skips)
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics

  def rerank(self, params: Any, similarity: np.ndarray, image_index: np.ndarray,
             text_index: np.ndarray, text_image: np.ndarray, length: int
             ) -> tuple[dict[str, float], Any]:
    """Recall@k with each query's top rerank_k candidates re-scored by the ITM head.

    similarity: [images, texts] over the kept images and texts; image_index / text_index: their
    positions in the split's records / self.texts; text_image: each text's image (row)."""
    ctx, cfg = self.ctx, self.cfg
    similarity = np.asarray(similarity, np.float64)  # float32 would lose it under the offset
    num_images, num_texts = similarity.shape
    k_i2t = num_texts if cfg.rerank_k < 0 else min(cfg.rerank_k, num_texts)
    k_t2i = num_images if cfg.rerank_k < 0 else min(cfg.rerank_k, num_images)
    top_i2t = np.argsort(-similarity, axis=1, kind="stable")[:, :k_i2t]  # [I, k] texts
    top_t2i = np.argsort(-similarity, axis=0, kind="stable")[:k_t2i].T  # [T, k] images
    pairs = np.unique(np.concatenate([
        np.stack([np.repeat(np.arange(num_images), k_i2t), top_i2t.reshape(-1)], 1),
        np.stack([top_t2i.reshape(-1), np.repeat(np.arange(num_texts), k_t2i)], 1)]), axis=0)
    needed = np.unique(pairs[:, 0])
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.read_threads)) as pool:
      pixels = dict(zip(needed.tolist(), pool.map(
          lambda i: ctx.image_row(self.source[int(image_index[i])].get("image"))["pixels"],
          needed.tolist())))
    tokens = {}

    def row(p: int) -> Mapping[str, np.ndarray]:
      image, text = pairs[p]
      if text not in tokens:
        tokens[text] = ctx.text_row(self.texts[int(text_index[text])], length)
      return {"pixels": pixels[int(image)], "input_ids": tokens[text]["input_ids"],
              "attention_mask": tokens[text]["attention_mask"]}

    out, skipped = ctx.map_split(len(pairs), row, self._itm, ctx.place(params), cfg.batch_size,
                                 cfg.read_threads)
    logits = np.asarray(out["logits"], np.float64)[np.argsort(out["index"])]
    if len(logits) != len(pairs):  # the images and texts were all read once already
      raise RuntimeError(f"re-ranking scored {len(logits)} of {len(pairs)} pairs")
    if cfg.rerank_score == "itm":
      value = np.exp(logits[:, 1] - np.logaddexp(logits[:, 0], logits[:, 1]))
    else:
      value = logits[:, 1] + similarity[pairs[:, 0], pairs[:, 1]]
    codes = pairs[:, 0] * num_texts + pairs[:, 1]  # sorted: pairs came out of np.unique
    rows = np.arange(num_images)[:, None]
    i2t = similarity - _OUTSIDE
    i2t[rows, top_i2t] = value[np.searchsorted(codes, rows * num_texts + top_i2t)]
    columns = np.arange(num_texts)[:, None]
    t2i = similarity - _OUTSIDE
    t2i[top_t2i, columns] = value[np.searchsorted(codes, top_t2i * num_texts + columns)]
    from_i2t = retrieval_metrics(i2t, text_image, cfg.ks)
    from_t2i = retrieval_metrics(t2i, text_image, cfg.ks)
    metrics = {k: v for k, v in from_i2t.items() if k.startswith("i2t")}
    metrics.update({k: v for k, v in from_t2i.items() if k.startswith("t2i")})
    metrics.update(k=float(max(k_i2t, k_t2i)), pairs=float(len(pairs)))
    return metrics, skipped
