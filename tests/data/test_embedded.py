"""The embedded corpus's evaluation parts (retrieval, text_pairs, vqa, ve) and sentence pairs."""

import collections

import numpy as np
import pytest

from flava_jax.data import embedded, sources, tokenizer
from tests.data import helpers

EVAL_PARTS = ("retrieval", "text_pairs", "vqa", "ve")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_OPENINGS = tuple(p for p in embedded._RETRIEVAL_PREFIXES if p) + ("there are ",)


def _records(part: str, split: str) -> list[dict]:
  src = sources.open_source(sources.SourceConfig(name=part, split=split), f"eval.{part}")
  return [src.record(i) for i in range(len(src))]


def _kinds(text: str) -> set[tuple[str, str]]:
  """The (colour, shape) pairs a description or claim names ("two red circles" -> red circle)."""
  words = text.rstrip("?").split()
  return {(w, words[i + 1].rstrip("s")) for i, w in enumerate(words[:-1])
          if w in embedded.COLOURS and words[i + 1].rstrip("s") in embedded.SHAPES}


def _parse_caption(caption: str) -> tuple[dict, str | None]:
  """A retrieval caption -> ({(colour, shape): (count, size or None)}, position or None)."""
  for opening in _OPENINGS:
    if caption.startswith(opening):
      caption = caption[len(opening):]
      break
  where = next((w for w in embedded._POSITIONS if caption.endswith(" " + w)), None)
  if where:
    caption = caption[:-len(where) - 1]
  groups = {}
  for phrase in caption.split(" and "):
    words = phrase.split()
    assert len(words) in (3, 4), caption
    size = words[1] if len(words) == 4 else None
    assert size in (None, "small", "large") and words[-2] in embedded.COLOURS, caption
    noun = words[-1]
    count = _COUNTS[words[0]]
    assert noun == embedded.SHAPES[embedded.SHAPES.index(noun.rstrip("s"))] + "s" * (count > 1)
    groups[(words[-2], noun.rstrip("s"))] = (count, size)
  return groups, where


@pytest.mark.parametrize("part", EVAL_PARTS)
def test_eval_parts_open_with_their_sizes_and_fields(part):
  for split in embedded.splits(part):
    src = sources.open_source(sources.SourceConfig(name=part, split=split), "x")
    assert len(src) == embedded.SIZES[(part, split)]
    for i in (0, len(src) - 1):
      record = src.record(i)
      assert set(record) == set(embedded.SCHEMAS[part]) | {"id"}
      assert record["id"] == f"{part}/{split}/{i}"
      if "image" in record:
        assert record["image"][:2] == b"\xff\xd8"  # JPEG
  assert embedded.splits("retrieval") == ("test",)
  assert embedded.splits("text") == embedded.splits("paired") == ("train", "test")


def test_missing_split_names_the_available_ones():
  with pytest.raises(ValueError, match=r"x\.split='train'.*retrieval part has splits \('test',\)"):
    sources.open_source(sources.SourceConfig(name="retrieval", split="train"), "x")
  with pytest.raises(ValueError, match=r"retrieval part has splits \('test',\), not 'train'"):
    embedded.shard_pattern("retrieval", "train")
  with pytest.raises(ValueError, match=r"x\.name='vqa2'.*'ve'"):
    sources.open_source(sources.SourceConfig(name="vqa2", split="test"), "x")


def test_retrieval_captions_name_one_image_each():
  rows = _records("retrieval", "test")
  owner, facts = {}, []
  for i, row in enumerate(rows):
    captions = row["captions"]
    assert len(captions) == embedded.RETRIEVAL_CAPTIONS == len(set(captions))
    for c in captions:
      assert owner.setdefault(c, i) == i, f"{c!r} describes images {owner[c]} and {i}"
    # All five describe the same scene: the same groups, and sizes / position where stated.
    parsed = [_parse_caption(c) for c in captions]
    kinds = {kind: count for kind, (count, _) in parsed[0][0].items()}
    sizes, where = {}, None
    for groups, w in parsed:
      assert {kind: count for kind, (count, _) in groups.items()} == kinds, captions
      for kind, (_, size) in groups.items():
        if size:
          assert sizes.setdefault(kind, size) == size, captions
      if w:
        assert where in (None, w) and (len(kinds) == 1 and sum(kinds.values()) == 1), captions
        where = w
    facts.append((kinds, sizes, where))
  # No caption surely fits another image (what each image's captions reveal of its scene).
  for i, row in enumerate(rows):
    for c in row["captions"]:
      groups, w = _parse_caption(c)
      for j, (kinds, sizes, where) in enumerate(facts):
        if j == i or {k: n for k, (n, _) in groups.items()} != kinds:
          continue
        sure = all(s is None or sizes.get(k) == s for k, (_, s) in groups.items()) and (
            w is None or where == w)
        assert not sure, f"{c!r} (image {i}) also fits image {j}"
  phrasings = [c for row in rows for c in row["captions"]]
  assert any(c.startswith("there ") for c in phrasings)
  assert any(" one " in f" {c} " for c in phrasings)
  assert any("small" not in c and "large" not in c for c in phrasings)
  assert any(c.startswith("a small") or c.startswith("a large") for c in phrasings)


@pytest.mark.parametrize("split", ("train", "test"))
def test_text_pairs_labels_follow_the_premise(split):
  rows = _records("text_pairs", split)
  labels = np.array([r["label"] for r in rows])
  assert 0.4 < labels.mean() < 0.6
  one_word_changed = 0
  for r in rows:
    present, claimed = _kinds(r["text"]), _kinds(r["text_pair"])
    assert 1 <= len(present) <= 2 and len(claimed) == 1, r
    assert r["label"] == int(claimed <= present), r
    (colour, shape), = claimed
    if not r["label"]:
      one_word_changed += any(colour == c or shape == s for c, s in present)
  assert one_word_changed > 0.8 * (labels == 0).sum()  # negatives need both words read


def test_vqa_answers_come_from_the_vocabulary_and_the_majority_is_right():
  assert embedded.vqa_answers() == embedded.VQA_ANSWERS
  assert len(embedded.VQA_ANSWERS) == 8 + 4 + 3 == len(set(embedded.VQA_ANSWERS))
  rows = _records("vqa", "train")[:600] + _records("vqa", "test")
  kinds = collections.Counter()
  for r in rows:
    answers = r["answers"]
    assert len(answers) == embedded.VQA_ANNOTATORS
    assert set(answers) <= set(embedded.VQA_ANSWERS)
    best, votes = collections.Counter(answers).most_common(1)[0]
    assert votes >= 7
    q = r["question"]
    if q.startswith("what colour"):
      kinds["colour"] += 1
      assert best in embedded.COLOURS
      assert q.split()[-1].rstrip("?").rstrip("s") in embedded.SHAPES
      pixels = helpers.as_rgb(r["image"]).reshape(-1, 3).astype(int)
      target = np.array(embedded.COLOURS[best])
      assert (np.abs(pixels - target).sum(-1) < 60).sum() > 50, r["id"]  # drawn in it
    elif q.startswith("what shape"):
      kinds["shape"] += 1
      assert best in embedded.SHAPES
    else:
      kinds["count"] += 1
      assert q.startswith("how many") and best in ("one", "two", "three")
  assert min(kinds.values()) > 0.25 * len(rows)


@pytest.mark.parametrize("split", ("train", "test"))
def test_ve_labels_are_balanced_and_neutral_claims_are_undecidable(split):
  rows = _records("ve", split)
  counts = collections.Counter(r["label"] for r in rows)
  assert set(counts) == {0, 1, 2} and min(counts.values()) > 0.25 * len(rows)
  assert embedded.VE_LABELS[1] == "neutral"
  neutral = tuple(p for pair in embedded._NEUTRAL for p in pair)
  for r in rows:
    h = r["hypothesis"]
    assert (embedded.VE_LABELS[r["label"]] == "neutral") == h.endswith(neutral), r
    if r["label"] == 1:
      assert h.startswith("the ") and len(_kinds(h)) == 1
  # Entailed "the shapes are X" claims: the image is drawn in X.
  for r in rows[:300]:
    h = r["hypothesis"]
    if r["label"] == 0 and h.startswith(("the shape is", "the shapes are")):
      pixels = helpers.as_rgb(r["image"]).reshape(-1, 3).astype(int)
      target = np.array(embedded.COLOURS[h.split()[-1]])
      assert (np.abs(pixels - target).sum(-1) < 60).sum() > 50, r["id"]


def test_eval_texts_are_in_the_vocabulary():
  tok = tokenizer.Tokenizer(embedded.vocab_file())
  vocab = set(tok._make().get_vocab())
  words = set(embedded.VQA_ANSWERS)
  for part, field in (("retrieval", "captions"), ("text_pairs", "text_pair"), ("vqa", "question"),
                      ("ve", "hypothesis")):
    for r in _records(part, "test"):
      texts = r[field] if isinstance(r[field], list) else [r[field]]
      words |= {w for t in texts for w in t.rstrip("?").split()}
  assert words - vocab == set()


def test_encode_pair_token_types_and_truncation():
  tok = tokenizer.Tokenizer(embedded.vocab_file())
  ids, mask, types = tok.encode_pair("two small red circles", "there is a red circle", 16)
  assert ids.dtype == mask.dtype == types.dtype == np.int32 and ids.shape == (16,)
  seps = np.flatnonzero(ids == tok.sep_id)
  assert ids[0] == tok.cls_id and list(seps) == [5, 11] and mask.sum() == 12
  assert list(types) == [0] * 6 + [1] * 6 + [0] * 4  # padding is type 0
  assert (ids[12:] == tok.pad_id).all() and (mask[:12] == 1).all()
  assert tok.decode(ids) == "two small red circles there is a red circle"
  long = " ".join(["red circle"] * 20)
  ids, mask, types = tok.encode_pair(long, "a blue square", 10)  # the longer text is cut
  seps = np.flatnonzero(ids == tok.sep_id)
  assert mask.sum() == 10 and list(seps) == [5, 9] and list(types) == [0] * 6 + [1] * 4
  assert tok.decode(ids[6:9]) == "a blue square"
  plain = tok.encode("two small red circles", 16)[0]  # single texts are unchanged
  assert list(plain[:6]) == list(tok.encode_pair("two small red circles", "x", 16)[0][:6])


def test_capfilt_parts_open_with_their_sizes_and_fields():
  for part in ("human", "web"):
    assert embedded.splits(part) == ("train",)
    src = sources.open_source(sources.SourceConfig(name=part, split="train"), "x")
    assert len(src) == embedded.SIZES[(part, "train")]
    record = src.record(len(src) - 1)
    assert set(record) == set(embedded.SCHEMAS[part]) | {"id"}
    assert record["image"][:2] == b"\xff\xd8"


def test_web_noise_is_recorded_and_true_to_its_kind():
  rows = _records("web", "train")
  counts = collections.Counter(r["noise"] for r in rows)
  n = len(rows)
  for kind, share in embedded.WEB_NOISE.items():  # within 4 binomial standard deviations
    assert abs(counts[kind] / n - share) < 4 * np.sqrt(share * (1 - share) / n), (kind, counts)
  assert set(counts) == set(embedded.NOISE_KINDS)
  for r in rows:
    scene = embedded.scene_from_json(r["scene"])
    # Clean captions are true of their scene; every corrupted one is not.
    assert embedded.caption_fits(r["caption"], scene) == (r["noise"] == "clean"), r
    stated, _ = embedded.parse_caption(r["caption"])
    if r["noise"] == "uninformative":
      assert stated == []
    if r["noise"] == "partly_wrong":  # the same groups, one of them recoloured or reshaped
      groups, _ = scene
      named = {(g["colour"], g["shape"]) for g in stated}
      true = {(g["colour"], g["shape"]) for g in groups}
      assert len(stated) == len(groups) and len(named - true) == 1, r


def test_human_captions_are_true_of_their_scene_only():
  rows = _records("human", "train")
  scenes = [embedded.scene_from_json(r["scene"]) for r in rows]
  assert all(embedded.caption_fits(r["caption"], s) for r, s in zip(rows, scenes))
  # Phrased like the retrieval captions: several openings, sizes sometimes left out.
  openings = collections.Counter(r["caption"].split()[0] for r in rows)
  assert len(openings) >= 4
  assert 0.1 < np.mean([all(g["size"] is None for g in embedded.parse_caption(r["caption"])[0])
                        for r in rows]) < 0.9


def test_parse_caption_reads_counts_sizes_and_positions():
  groups, where = embedded.parse_caption("there are two small red circles and an orange square")
  assert groups == [dict(count=2, size="small", colour="red", shape="circle"),
                    dict(count=1, size=None, colour="orange", shape="square")]
  assert where is None
  groups, where = embedded.parse_caption("a picture of one large cyan diamond on the left")
  assert groups == [dict(count=1, size="large", colour="cyan", shape="diamond")]
  assert where == "on the left"
  assert embedded.parse_caption("click to enlarge") == ([], None)
  scene = ([dict(count=2, size="small", colour="red", shape="circle")], None)
  assert embedded.caption_fits("two red circles", scene)
  assert not embedded.caption_fits("two large red circles", scene)
  assert not embedded.caption_fits("a red circle", scene)
  assert not embedded.caption_fits("two red circles on the left", scene)


def test_the_kept_vocabulary_covers_the_captions():
  """The vocabulary is the package's kept file (ids equal on every machine), and every word of the
  human and web captions but the uninformative ones is one of its tokens."""
  with open(embedded.vocab_file(), "rb") as a, open(embedded.KEPT_VOCAB, "rb") as b:
    assert a.read() == b.read()
  vocab = set(tokenizer.Tokenizer(embedded.vocab_file())._make().get_vocab())
  words = {w for part in ("human", "web") for r in _records(part, "train")
           if r.get("noise", "clean") != "uninformative" for w in r["caption"].split()}
  assert words - vocab == set()
