"""Captions of held-out images, and whether they describe their own image.

A model with a captioning decoder (its task's predict().caption: BLIP) writes one caption per
image of a split (a prompt, then beam search or sampling). Each caption's content words (`words`;
by default the embedded corpus's colour and shape names) are checked against the image's own
reference captions and against another image's (image i against image (i + n/2) mod n, a fixed
pairing with no image matched to itself):

  own_word_precision    of the content words a caption names, the share found in the image's own
                        captions (mean over captions that name at least one)
  other_word_precision  the same share against the other image's captions: what naming words at
                        random from the corpus's distribution scores
  content_words         content words per caption
  caption_tokens        generated tokens per caption, [SEP] excluded

A captioner that looks at its image scores own well above other; one that ignores the image
scores them alike. BLEU and CIDEr against reference captions come with BLIP's captioning
evaluation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Any

import jax
import numpy as np

from flava_jax.data import embedded
from flava_jax.evals.features import INDEX_KEY, EvalContext, TaskConfig, open_split
from flava_jax.evals.retrieval import _captions

# The embedded corpus's content words: what its scenes are made of.
EMBEDDED_WORDS = tuple(embedded.COLOURS) + tuple(embedded.SHAPES)


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "captioning"
  # The split: image + "caption" (a string or a list of strings), e.g. COCO Karpathy test with
  # fields.caption="captions/text"; by default the embedded held-out pairs.
  data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="paired", split="test",
      fields=dict(image="image", caption="caption")))
  prompt: str = "a picture of "
  method: str = "beam"  # beam | greedy | sample
  max_length: int = 20  # counts the prompt's tokens, as the reference does
  min_length: int = 5
  num_beams: int = 3
  top_p: float = 0.9
  repetition_penalty: float = 1.0
  seed: int = 0  # sampling only
  # Content words checked against the reference captions (lower case; plural "s" accepted);
  # () = the embedded corpus's colours and shapes.
  words: tuple = ()
  limit: int = 0  # images captioned (0: all)


def content_words(text: str, words: frozenset[str]) -> list[str]:
  """The words of `text` in `words`, a plural "s" or "es" dropped ("circles" -> "circle")."""
  out = []
  for token in re.findall(r"[a-z]+", text.lower()):
    for form in (token, token[:-1] if token.endswith("s") else None,
                 token[:-2] if token.endswith("es") else None):
      if form in words:
        out.append(form)
        break
  return out


def decode_caption(tokenizer: Any, tokens: np.ndarray) -> str:
  """Generated ids -> text: cut at [SEP]; special ids and ids past the tokenizer's vocabulary
  (BLIP's [DEC], [ENC]) dropped."""
  ids = []
  for t in np.asarray(tokens).tolist():
    if t == tokenizer.sep_id:
      break
    if t < tokenizer.vocab_size and t not in tokenizer.special_ids:
      ids.append(t)
  return tokenizer.decode(ids)


def word_precision(generated: list[list[str]], references: list[set[str]]) -> tuple[float, int]:
  """(mean over captions naming any content word of the share found in its references,
  how many captions name one)."""
  shares = [np.mean([w in ref for w in gen]) for gen, ref in zip(generated, references) if gen]
  return (float(np.mean(shares)) if shares else 0.0), len(shares)


class Evaluator:
  """Captions a split's images and scores their content words against own and other captions."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    if ctx.tokenizer is None:
      raise ValueError(f"{where}: captioning needs the model's tokenizer")
    self.cfg, self.ctx = cfg, ctx
    self.source = open_split(cfg.data, ("image", "caption"), f"{where}.data", ctx.cache_dir)
    count = len(self.source) if not cfg.limit else min(cfg.limit, len(self.source))
    if count < 2:
      raise ValueError(f"{where}.data: captioning needs at least 2 images, the split has {count}")
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.read_threads)) as pool:
      self.references = list(pool.map(
          lambda i: _captions(self.source[i].get("caption"), ctx.max_text_bytes), range(count)))
    self.count = count
    self.words = frozenset(w.lower() for w in (cfg.words or EMBEDDED_WORDS))
    self.settings = ctx.predict.caption_settings(
        method=cfg.method, max_length=cfg.max_length, min_length=cfg.min_length,
        num_beams=cfg.num_beams, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty)
    self.prompt = ctx.predict.caption_prompt(ctx.tokenizer, cfg.prompt)
    key = jax.random.key(cfg.seed)
    self._caption = lambda p, b: {"tokens": ctx.predict.caption(
        p, b, self.prompt, self.settings, jax.random.fold_in(key, b[INDEX_KEY][0]))}

  def captions(self, params: Any) -> tuple[dict[int, str], dict[int, int], Any]:
    """({image index: caption}, {image index: generated tokens}, skip counts)."""
    ctx = self.ctx
    out, skipped = ctx.map_split(
        self.count, lambda i: ctx.image_row(self.source[i].get("image")), self._caption,
        ctx.place(params), self.cfg.batch_size, self.cfg.read_threads)
    sep = ctx.tokenizer.sep_id
    texts, lengths = {}, {}
    for index, tokens in zip(out[INDEX_KEY].tolist(), out["tokens"]):
      texts[index] = decode_caption(ctx.tokenizer, tokens)
      ends = np.flatnonzero(tokens == sep)
      lengths[index] = int(ends[0]) if len(ends) else len(tokens)
    return texts, lengths, skipped

  def __call__(self, params: Any) -> dict[str, float]:
    texts, lengths, skipped = self.captions(params)
    kept = sorted(texts)
    generated = [content_words(texts[i], self.words) for i in kept]
    own = [set(w for ref in self.references[i] for w in content_words(ref, self.words))
           for i in kept]
    other_index = [(i + self.count // 2) % self.count for i in kept]
    other = [set(w for ref in self.references[j] for w in content_words(ref, self.words))
             for j in other_index]
    own_precision, naming = word_precision(generated, own)
    other_precision, _ = word_precision(generated, other)
    metrics = {"own_word_precision": own_precision, "other_word_precision": other_precision,
               "content_words": float(np.mean([len(g) for g in generated])) if kept else 0.0,
               "caption_tokens": float(np.mean([lengths[i] for i in kept])) if kept else 0.0,
               "captions_naming_words": float(naming), "images": float(len(kept))}
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
