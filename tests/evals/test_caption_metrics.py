"""BLEU and CIDEr-D of captions (evals/captioning.caption_scores) against direct transcriptions of
their definitions (Papineni et al. 2002 with COCO's closest-reference brevity penalty; Vedantam et
al. 2015's CIDEr-D: tf-idf n-gram vectors, clipped, Gaussian length penalty sigma 6, x10)."""

import collections
import math

import numpy as np
import pytest

from flava_jax.evals.captioning import caption_scores, coco_tokenize

CANDIDATES = {
    "a": "a picture of two red circles",
    "b": "a blue square on the left",
    "c": "three small green triangles and a black diamond",
    "d": "an orange circle",
    "e": "a picture of a picture",
}
REFERENCES = {
    "a": ["two red circles", "a picture of two small red circles", "there are two red circles"],
    "b": ["a small blue square on the left", "a blue square", "i can see a blue square on the left",
          "a drawing of one blue square"],
    "c": ["three small green triangles and a large black diamond",
          "a large black diamond and three green triangles"],
    "d": ["a large orange circle in the middle", "an orange circle", "one orange circle",
          "a picture of a large orange circle", "there is an orange circle"],
    "e": ["a yellow square at the top", "a small yellow square"],
}


def _ngrams(words, n):
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _bleu(cands, refs, max_n=4):
  matched, total = np.zeros(max_n), np.zeros(max_n)
  cand_len = ref_len = 0
  for k, cand in cands.items():
    words = cand.split()
    ref_words = [r.split() for r in refs[k]]
    cand_len += len(words)
    ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    for n in range(1, max_n + 1):
      counts = _ngrams(words, n)
      best = collections.Counter()
      for r in ref_words:
        best |= _ngrams(r, n)  # the most times each n-gram appears in one reference
      matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      total[n - 1] += max(len(words) - n + 1, 0)
  penalty = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len)
  return [penalty * math.exp(np.mean(np.log(matched[:n] / total[:n]))) for n in range(1, 5)]


def _cider_d(cands, refs, max_n=4, sigma=6.0):
  keys = sorted(cands)
  df = collections.Counter()
  for k in keys:
    df.update({g for r in refs[k] for n in range(1, max_n + 1) for g in _ngrams(r.split(), n)})
  log_docs = math.log(len(keys))

  def vectors(words):
    vec = [{} for _ in range(max_n)]
    for n in range(1, max_n + 1):
      for g, tf in _ngrams(words, n).items():
        vec[n - 1][g] = tf * (log_docs - math.log(max(1.0, df[g])))
    return vec

  scores = []
  for k in keys:
    words = cands[k].split()
    hyp = vectors(words)
    per_ref = []
    for r in refs[k]:
      ref = vectors(r.split())
      sims = []
      for n in range(max_n):
        dot = sum(min(v, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, v in hyp[n].items())
        norm = math.sqrt(sum(v * v for v in hyp[n].values()) * sum(v * v for v in ref[n].values()))
        sims.append((dot / norm if norm else dot)
                    * math.exp(-((len(words) - len(r.split())) ** 2) / (2 * sigma**2)))
      per_ref.append(np.mean(sims))
    scores.append(10.0 * np.mean(per_ref))
  return float(np.mean(scores))


def test_bleu_and_cider_equal_their_definitions():
  scores = caption_scores(CANDIDATES, REFERENCES)
  expected = _bleu(CANDIDATES, REFERENCES)
  for n in range(4):
    assert scores[f"bleu_{n + 1}"] == pytest.approx(expected[n], rel=1e-6), n
  assert scores["cider"] == pytest.approx(_cider_d(CANDIDATES, REFERENCES), rel=1e-9)
  assert 0.0 < scores["bleu_4"] < scores["bleu_1"] < 1.0 and scores["cider"] > 0.5


def test_a_perfect_caption_set_and_an_unrelated_one():
  refs = {k: v for k, v in REFERENCES.items() if k != "e"}
  perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs)
  assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
  unrelated = caption_scores({k: "zebra giraffe elephant hippo" for k in refs}, refs)
  assert unrelated["bleu_1"] < 1e-6 and unrelated["cider"] == 0.0
  with pytest.raises(ValueError, match=r"\['x'\] have no reference"):
    caption_scores({"x": "a red circle"}, {"x": []})


def test_coco_tokenize_lowercases_and_drops_punctuation():
  assert coco_tokenize("A Man's dog, running.  Fast!") == "a man 's dog running fast"
  assert coco_tokenize("two red circles (small); 3.5 cm") == "two red circles small 3.5 cm"
  assert coco_tokenize("It doesn't fit") == "it does n't fit"
