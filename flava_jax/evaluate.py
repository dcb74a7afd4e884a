"""Evaluation: zero-shot image-text retrieval (more evaluators come with the evaluation issue).

`retrieval_metrics` scores a [images, texts] similarity matrix (image i's caption is text i);
`zero_shot_retrieval` embeds a held-out paired split (eval transforms: the whole image, no masks)
with a model and scores it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax.data import pipeline, sources, transforms
from flava_jax.models.flava import FlavaModel


def retrieval_metrics(similarity: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
  """Image->text and text->image recall@k for one caption per image (row i matches column i)."""
  similarity = np.asarray(similarity, np.float64)
  n = similarity.shape[0]
  diagonal = similarity[np.arange(n), np.arange(n)]
  # Rank of the right answer = how many candidates score strictly higher.
  i2t_rank = (similarity > diagonal[:, None]).sum(1)
  t2i_rank = (similarity > diagonal[None, :]).sum(0)
  out = {}
  for k in ks:
    out[f"i2t_r@{k}"] = float((i2t_rank < k).mean())
    out[f"t2i_r@{k}"] = float((t2i_rank < k).mean())
  return out


def embed_pairs(model: FlavaModel, params: Any, rows: list[dict], batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
  """(image embeddings [N, D], text embeddings [N, D]) of preprocessed eval rows."""
  image_fn = jax.jit(lambda p, x: model.apply({"params": p}, transforms.encoder_pixels(x),
                                              method="image_embedding"))
  text_fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                     method="text_embedding"))
  images, texts = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    images.append(np.asarray(image_fn(params, jnp.asarray(np.stack([r["pixels"] for r in chunk])))))
    texts.append(np.asarray(text_fn(params, jnp.asarray(np.stack([r["input_ids"] for r in chunk])),
                                    jnp.asarray(np.stack([r["attention_mask"] for r in chunk])))))
  return np.concatenate(images), np.concatenate(texts)


def eval_rows(config: Any, kind: str, source_config: sources.SourceConfig | None = None,
              limit: int | None = None) -> list[dict]:
  """Preprocessed held-out examples of one kind (eval transforms: whole image, no masks), the
  bad ones skipped. Default source: the embedded corpus's test split of that kind."""
  cfg, _ = pipeline.data_config(config.data)
  shapes = pipeline.Shapes.from_config(config)
  tok = pipeline.load_tokenizer(cfg, shapes) if kind != "image" else None
  processor = pipeline.make_processor(kind, cfg, shapes, tok, train=False)
  source_config = source_config or sources.SourceConfig(name=kind, split="test",
                                                        cache_dir=cfg.cache_dir)
  source = sources.open_source(source_config, f"eval.{kind}")
  source.check(kind)
  count = len(source) if limit is None else min(limit, len(source))
  rows = [processor(source[i], None) for i in range(count)]
  return [r for r in rows if "_skip" not in r]


def zero_shot_retrieval(config: Any, model: FlavaModel, params: Any,
                        source_config: sources.SourceConfig | None = None) -> dict[str, float]:
  """R@1/5/10 both ways on a held-out paired split (default: the embedded corpus's test pairs)."""
  rows = eval_rows(config, "paired", source_config)
  params = jax.device_get(params)
  images, texts = embed_pairs(model, params, rows)
  metrics = retrieval_metrics(images @ texts.T)
  metrics["examples"] = len(rows)
  metrics["chance_r@1"] = 1.0 / len(rows)
  return metrics
