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
scores them alike. Against all of the image's reference captions, as COCO's captioning benchmark
scores them (pycocoevalcap's scorers):

  bleu_1 .. bleu_4      corpus BLEU (the closest reference length for the brevity penalty)
  cider                 CIDEr-D (document frequencies from the split's references)
Papers print both x100: BLIP's BLEU-4 39.7 and CIDEr 133.3 are 0.397 and 1.333 here.

COCO tokenizes with the Stanford PTB tokenizer (Java); here `coco_tokenize` does what it does to
captions (lower case, punctuation dropped, "'s" split off) in Python, so scores can differ from
the Java path on captions with unusual punctuation.
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


# The punctuation COCO's evaluation removes after PTB tokenization.
_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                          ",", ":", "-", "--", "...", ";"])


def coco_tokenize(text: str) -> str:
  """A caption as COCO's evaluation tokenizes it: lower case, words and clitics ("'s", "n't")
  split, its punctuation tokens dropped, joined by single spaces."""
  text = re.sub(r"n't\b", " n't", text.lower())  # "doesn't" -> "does n't", as PTB splits it
  tokens = re.findall(r"n't|'[a-z]+|[a-z0-9]+(?:[.,][0-9]+)*|[^\sa-z0-9]+", text)
  out = [t for t in tokens if t not in _PUNCTUATION and not re.fullmatch(r"[^\w']+", t)]
  return " ".join(out)


def caption_scores(candidates: dict[Any, str], references: dict[Any, list[str]]
                   ) -> dict[str, float]:
  """BLEU-1..4 and CIDEr-D of one candidate per key against its references (every key of
  `candidates` needs at least one reference), through pycocoevalcap's scorers, as fractions
  (papers print them x100)."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  keys = sorted(candidates)
  if not keys:
    return {}
  missing = [k for k in keys if not references.get(k)]
  if missing:
    raise ValueError(f"captions {missing[:5]} have no reference caption")
  res = {k: [coco_tokenize(candidates[k])] for k in keys}
  gts = {k: [coco_tokenize(r) for r in references[k]] for k in keys}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
  out["cider"] = float(cider)
  return out


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
    with_refs = [i for i in kept if self.references[i]]
    metrics.update(caption_scores({i: texts[i] for i in with_refs},
                                  {i: self.references[i] for i in with_refs}))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
