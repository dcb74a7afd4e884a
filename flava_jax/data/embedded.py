"""The embedded default corpus: needs no download, built on first use and cached.

Pretraining parts (a train and a held-out test split each):
- paired: procedurally drawn scenes (shapes of given colours, sizes, counts and positions on a
  plain background) with captions that describe them, so that retrieval and zero-shot figures
  measure something real. Test captions are unique (one right answer per retrieval query).
- image: single-kind scenes labelled by (colour, shape): 32 classes named like "red circle".
- text: English prose for MLM, the documentation topics that ship with Python (pydoc_data).

Evaluation parts, drawn from the same scenes (records: `SCHEMAS`):
- retrieval (test only): scenes with five differently phrased captions each, every one of them
  true of its scene and of no other scene in the split (COCO-style five-caption retrieval).
- text_pairs (text only): a scene description and a claim "there is a red circle", labelled 1
  when the description entails it (GLUE-style sentence-pair classification).
- vqa: single-group scenes, a question on colour, shape or count and ten simulated annotators'
  answers from `VQA_ANSWERS` (VQA v2-style soft scores).
- ve: a scene and a hypothesis labelled entailment / neutral / contradiction (SNLI-VE-style).

CapFilt parts (BLIP's bootstrapping, tools/capfilt.py), train only:
- human: scenes with one clean caption each, phrased like the retrieval captions: the small,
  human-annotated corpus (COCO's role) the captioner and the filter are fine-tuned on.
- web: scenes with alt-text-like captions, a known share of them noisy (`WEB_NOISE`): another
  scene's caption ("mismatched"), the scene's caption with one colour or shape changed
  ("partly_wrong"), or words that say nothing of the scene ("uninformative"). Each record keeps its
  corruption ("noise") and the scene ("scene", JSON) for measurement only; training reads image
  and caption.

Audio part (the audio tasks), built on first use into a folder of its own (`ensure_spoken`):
- spoken: scenes drawn as the paired part's, each caption also spoken by eSpeak NG (data/speech.py)
  with a voice, rate and pitch drawn per record (`VOICES`, `SPOKEN_RATES`, `SPOKEN_PITCHES`), as
  16 kHz mono FLAC; records {image, caption, audio, voice, scene, label}: the scene as JSON and,
  for a scene of one kind of shape, its (colour, shape) class as the image part labels it (-1 for
  two kinds; the tri-modal linear probe's label). Test captions are unique and none is a
  train caption (held out). Synthesis runs SPEECH_CHUNK captions per fresh process, so two builds
  are byte-identical on one machine (libFLAC's and eSpeak NG's versions are pinned by the wheels).

vocab.txt is a small WordPiece vocabulary trained on the train splits' texts of VOCAB_PARTS
(never the test splits'). The trainer (tokenizers') breaks ties between equally frequent merges
differently from run to run, so the vocabulary trained once is kept in the package
(embedded_vocab.txt) and copied: token ids are the same on every machine. Everything else is
drawn from fixed seeds: two builds are byte-identical. The shards are our
own ArrayRecord format (records.py), read through the same path as user data.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from flava_jax.data import records, tokenizer

VERSION = 3  # bump when the generator changes: the cache directory is named after it
# The random streams are seeded with version 1's seed (not VERSION), so that parts which did not
# change stay byte-identical across versions (figures measured on them remain comparable).
_SEED = 1
IMAGE_SIZE = 128
VOCAB_SIZE = 1024
# A part's seed depends on its index here and its split's in SPLITS: only append to both.
PARTS = ("paired", "image", "text", "retrieval", "text_pairs", "vqa", "ve", "human", "web",
         "spoken")
# Parts built on first use into a folder of their own (spoken_dir), not with the rest: only the
# audio tasks read them, and their synthesis takes a while.
LAZY_PARTS = ("spoken",)
SPOKEN_VERSION = 3  # bump when the spoken part's generator changes (its folder is named after it)
# The parts whose train texts teach vocab.txt (those of version 2: its vocabulary is unchanged).
VOCAB_PARTS = ("paired", "image", "text", "retrieval", "text_pairs", "vqa", "ve")
SPLITS = ("train", "test")  # every split name; a part has those of `splits(part)`
# Examples per (part, split); text is cut 90/10 from its source instead (`text_examples`).
SIZES = {("paired", "train"): 6000, ("paired", "test"): 256,
         ("image", "train"): 2000, ("image", "test"): 320,
         ("retrieval", "test"): 200,
         ("text_pairs", "train"): 4000, ("text_pairs", "test"): 400,
         ("vqa", "train"): 3000, ("vqa", "test"): 300,
         ("ve", "train"): 3000, ("ve", "test"): 300,
         ("human", "train"): 1000, ("web", "train"): 6000,
         ("spoken", "train"): 3000, ("spoken", "test"): 256}
# The fields of each part's records (all also have "id", a string naming part/split/index).
SCHEMAS = {"paired": ("image", "caption"), "image": ("image", "label"), "text": ("text",),
           "retrieval": ("image", "captions"), "text_pairs": ("text", "text_pair", "label"),
           "vqa": ("image", "question", "answers"), "ve": ("image", "hypothesis", "label"),
           "human": ("image", "caption", "scene"), "web": ("image", "caption", "noise", "scene"),
           "spoken": ("image", "caption", "audio", "voice", "scene", "label")}
TEXT_CHARS = 400  # characters per text example (paragraphs joined up to this)
RETRIEVAL_CAPTIONS = 5  # captions per retrieval scene
VQA_ANNOTATORS = 10  # answers per VQA question

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (140, 60, 180), "orange": (245, 135, 30),
           "black": (25, 25, 25), "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle", "diamond")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_COUNT_VALUES = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_NUMBERS = {1: "one", 2: "two", 3: "three"}
VQA_ANSWERS = tuple(COLOURS) + SHAPES + tuple(_NUMBERS.values())
TEXT_PAIR_LABELS = ("not entailed", "entailed")  # text_pairs' label 0 / 1
VE_LABELS = ("entailment", "neutral", "contradiction")
_POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
              "at the bottom": (0.5, 0.75), "in the middle": (0.5, 0.5)}
_RADIUS = {"small": (9, 13), "large": (20, 26)}
_BACKGROUNDS = ((250, 250, 250), (225, 225, 225), (240, 230, 210), (215, 230, 240))
_PREFIXES = ("", "a picture of ", "an image with ", "a drawing of ")
# Retrieval captions add two openings whose words the train texts teach the vocabulary (the
# claims of text_pairs and ve, and "are" from the VQA questions).
_RETRIEVAL_PREFIXES = _PREFIXES + ("i can see ", "there is ")
_CLAIMS = ("there is {}", "i can see {}", "the picture shows {}")  # {}: "a red circle"
# The web part's corruption: kind -> share of the records (the rest are "clean").
WEB_NOISE = {"mismatched": 0.2, "partly_wrong": 0.15, "uninformative": 0.1}
NOISE_KINDS = ("clean",) + tuple(WEB_NOISE)
# Alt-text that says nothing of the picture ({} a number).
_UNINFORMATIVE = ("image {}", "img {}", "photo {}", "picture", "click to enlarge",
                  "untitled {}", "stock image {}", "download now", "thumbnail", "see more")
_NEUTRAL = (("was drawn by a child", "were drawn by a child"),
            ("was drawn yesterday", "were drawn yesterday"),
            ("is made of paper", "are made of paper"))


# The spoken part's speakers: eSpeak NG voices (data/speech.py), and the ranges its rate (words
# per minute) and pitch (0-99) are drawn from per record.
VOICES = ("en-us", "en", "en+f3", "en-us+f3", "en-029", "en-gb-scotland")
SPOKEN_RATES = (140, 200)
SPOKEN_PITCHES = (30, 70)
SPEECH_CHUNK = 100  # captions synthesized per fresh eSpeak NG process (speech.py)
AUDIO_RATE = 16_000  # the spoken part's audio: 16 kHz mono 16-bit FLAC


KEPT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_vocab.txt")


def default_cache_dir() -> str:
  return os.environ.get("FLAVA_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                        "flava_jax"))


def corpus_dir(cache_dir: str = "") -> str:
  return os.path.join(cache_dir or default_cache_dir(), f"embedded-v{VERSION}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
  elif shape == "square":
    s = r * 0.9
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)],
                 fill=colour)
  else:  # diamond
    draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)],
                 fill=colour)


def _place(rng: np.random.Generator, r: float, taken: list, around=None) -> tuple[float, float]:
  """A centre for a shape of radius r that avoids the shapes already placed (best effort)."""
  best = None
  for _ in range(60):
    if around is None:
      cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
    else:
      cx, cy = (np.asarray(around) * IMAGE_SIZE + rng.normal(0, 6, size=2)).clip(
          r + 2, IMAGE_SIZE - r - 2)
    gap = min((math.hypot(cx - x, cy - y) - r - q for x, y, q in taken), default=1e9)
    if best is None or gap > best[0]:
      best = (gap, cx, cy)
    if gap > 3:
      break
  return best[1], best[2]


def _render(groups: list[dict], rng: np.random.Generator, position=None) -> bytes:
  background = np.asarray(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))])
  image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in background))
  draw = ImageDraw.Draw(image)
  taken = []
  for g in groups:
    for _ in range(g["count"]):
      r = rng.uniform(*_RADIUS[g["size"]])
      cx, cy = _place(rng, r, taken, around=position)
      taken.append((cx, cy, r))
      _draw_shape(draw, g["shape"], cx, cy, r, COLOURS[g["colour"]])
  pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
  out = io.BytesIO()
  Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def _group(rng: np.random.Generator, count: int | None = None) -> dict:
  colours = list(COLOURS)
  return dict(colour=colours[rng.integers(len(colours))], shape=SHAPES[rng.integers(len(SHAPES))],
              size=("small", "large")[rng.integers(2)],
              count=int(count if count is not None else rng.integers(1, 4)))


def _a(word: str) -> str:
  """The indefinite article before `word`: "a red", "an orange"."""
  return "an" if word[0] in "aeiou" else "a"


def _phrase(g: dict, sized: bool = True, article: str = "a") -> str:
  """"two small red circles": the size word may be left out, and one shape is "a" or "one"."""
  noun = g["shape"] + ("s" if g["count"] > 1 else "")
  size = f"{g['size']} " if sized else ""
  count = article if g["count"] == 1 else _COUNT_WORDS[g["count"]]
  if count == "a":
    count = _a(size or g["colour"])
  return f"{count} {size}{g['colour']} {noun}"


def _scene(rng: np.random.Generator) -> tuple[list[dict], str | None]:
  """One or two groups of shapes, and where a single placed shape is ("on the left") or None."""
  if rng.random() < 0.4:  # one shape, placed: "a small red circle on the left"
    return [_group(rng, count=1)], list(_POSITIONS)[rng.integers(len(_POSITIONS))]
  groups = [_group(rng) for _ in range(1 + int(rng.random() < 0.5))]
  if len(groups) == 2 and groups[0]["colour"] == groups[1]["colour"] and (
      groups[0]["shape"] == groups[1]["shape"]):
    groups = groups[:1]
  return groups, None


def _describe(groups: list[dict], where: str | None) -> str:
  """A scene's full description: "a small red circle on the left", "two ... and a ..."."""
  text = " and ".join(_phrase(g) for g in groups)
  return f"{text} {where}" if where else text


def _draw(groups: list[dict], where: str | None, rng: np.random.Generator) -> bytes:
  return _render(groups, rng, position=_POSITIONS[where] if where else None)


def paired_example(rng: np.random.Generator) -> dict:
  """One scene and its caption."""
  return _paired_scene(rng)[0]


def _paired_scene(rng: np.random.Generator) -> tuple[dict, list[dict], str | None]:
  """(paired_example's record, the scene's groups, where) from the same draws."""
  groups, where = _scene(rng)
  image = _draw(groups, where, rng)
  return {"image": image, "caption": _PREFIXES[rng.integers(len(_PREFIXES))] +
          _describe(groups, where)}, groups, where


def scene_label(groups: list[dict]) -> int:
  """The CLASS_NAMES index of a scene of one kind of shape (one group), -1 for two kinds."""
  if len(groups) != 1:
    return -1
  return CLASS_NAMES.index(f"{groups[0]['colour']} {groups[0]['shape']}")


def image_example(rng: np.random.Generator) -> dict:
  """A scene of one (colour, shape) class, labelled with its index in CLASS_NAMES."""
  g = _group(rng)
  return {"image": _render([g], rng), "label": CLASS_NAMES.index(f"{g['colour']} {g['shape']}")}


def text_examples() -> list[str]:
  """Python's documentation topics, as paragraphs joined up to about TEXT_CHARS characters."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  chunks = []
  for key in sorted(topics.topics):
    current = ""
    for paragraph in topics.topics[key].split("\n\n"):
      paragraph = " ".join(paragraph.split())
      if len(paragraph) < 40:  # headings, rules and code fragments
        continue
      current = f"{current} {paragraph}".strip()
      if len(current) >= TEXT_CHARS:
        chunks.append(current)
        current = ""
    if current:
      chunks.append(current)
  return chunks


def _fits(stated: list[dict], where: str | None, scene: tuple[list[dict], str | None]) -> bool:
  """Whether a caption stating the groups `stated` (size None: not stated) and `where` (None: not
  stated) is true of `scene`. A caption names every group of its scene."""
  groups, scene_where = scene
  if len(stated) != len(groups) or (where and where != scene_where):
    return False
  by_kind = {(g["colour"], g["shape"]): g for g in groups}
  for g in stated:
    h = by_kind.get((g["colour"], g["shape"]))
    if h is None or h["count"] != g["count"] or g["size"] not in (None, h["size"]):
      return False
  return True


def _caption_variants(groups: list[dict], where: str | None,
                      options: list[tuple[bool, bool]]) -> list[str]:
  """Every phrasing of a scene that `options` ((sizes stated, position stated) pairs) allow:
  opening, order of the groups, "a" or "one"; distinct strings, in a fixed order."""
  out = []
  for sized, placed in options:
    for order in itertools.permutations(groups):
      articles = [("a", "one") if g["count"] == 1 else ("a",) for g in order]  # "a": unused
      for chosen in itertools.product(*articles):
        body = " and ".join(_phrase(g, sized, a) for g, a in zip(order, chosen))
        body += f" {where}" if placed else ""
        for prefix in _RETRIEVAL_PREFIXES:
          if prefix == "there is " and order[0]["count"] > 1:
            prefix = "there are "
          out.append(prefix + body)
  return out


def retrieval_examples(rng: np.random.Generator, n: int) -> list[dict]:
  """n scenes with RETRIEVAL_CAPTIONS captions each. No two scenes have the same groups (counts,
  sizes, colours, shapes), and a caption leaves out the sizes or the position only where no other
  scene of the split would then fit it: every caption is true of exactly one image."""
  scenes, keys = [], set()
  while len(scenes) < n:
    groups, where = _scene(rng)
    key = tuple(sorted((g["count"], g["size"], g["colour"], g["shape"]) for g in groups))
    if key not in keys:
      keys.add(key)
      scenes.append((groups, where))
  out, seen = [], set()
  for i, (groups, where) in enumerate(scenes):
    options = []  # (sizes stated, position stated) that no other scene fits
    for sized, placed in itertools.product((True, False), (True, False) if where else (False,)):
      stated = [dict(g, size=g["size"] if sized else None) for g in groups]
      if not any(_fits(stated, where if placed else None, other)
                 for j, other in enumerate(scenes) if j != i):
        options.append((sized, placed))
    variants = _caption_variants(groups, where, options)
    image = _draw(groups, where, rng)
    captions = [variants[k] for k in rng.choice(len(variants), RETRIEVAL_CAPTIONS, replace=False)]
    if seen & set(captions):  # cannot happen: a caption fits its own scene only
      raise AssertionError(f"retrieval captions {sorted(seen & set(captions))} repeat")
    seen |= set(captions)
    out.append({"image": image, "captions": captions})
  return out


def _absent_kind(rng: np.random.Generator, groups: list[dict]) -> tuple[str, str]:
  """A (colour, shape) that no group of the scene has: mostly a present group with only its
  colour or only its shape changed, so that telling it apart takes both words."""
  present = {(g["colour"], g["shape"]) for g in groups}
  g = groups[rng.integers(len(groups))]
  mode = rng.random()
  while True:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    if mode < 0.45:
      shape = g["shape"]
    elif mode < 0.9:
      colour = g["colour"]
    if (colour, shape) not in present:
      return colour, shape


def _claim(rng: np.random.Generator, groups: list[dict], true: bool) -> str:
  """"there is a red circle" (or another wording), true or false of the groups."""
  if true:
    g = groups[rng.integers(len(groups))]
    kind = (g["colour"], g["shape"])
  else:
    kind = _absent_kind(rng, groups)
  return _CLAIMS[rng.integers(len(_CLAIMS))].format(f"{_a(kind[0])} {kind[0]} {kind[1]}")


def text_pair_example(rng: np.random.Generator) -> dict:
  """A scene description, a claim about it, and 1 when the description entails the claim."""
  groups, where = _scene(rng)
  premise = _PREFIXES[rng.integers(len(_PREFIXES))] + _describe(groups, where)
  label = int(rng.random() < 0.5)
  return {"text": premise, "text_pair": _claim(rng, groups, bool(label)), "label": label}


def vqa_example(rng: np.random.Generator) -> dict:
  """A single-group scene, a question on its colour, shape or count and VQA_ANNOTATORS answers:
  mostly the right one, and 0-3 wrong ones of the same kind (annotators' slips)."""
  g = _group(rng)
  image = _render([g], rng)
  one = g["count"] == 1
  noun = g["shape"] + ("" if one else "s")
  kind = rng.integers(3)
  if kind == 0:
    question = f"what colour {'is' if one else 'are'} the {noun}?"
    answer, pool = g["colour"], tuple(COLOURS)
  elif kind == 1:
    if rng.random() < 0.5:
      question = "what shape is it?" if one else "what shape are they?"
    else:
      question = (f"what shape is the {g['colour']} thing?" if one else
                  f"what shape are the {g['colour']} things?")
    answer, pool = g["shape"], SHAPES
  else:
    question = f"how many {g['shape']}s are there?"
    answer, pool = _NUMBERS[g["count"]], tuple(_NUMBERS.values())
  wrong = [a for a in pool if a != answer]
  slips = int(rng.integers(4))
  answers = [answer] * (VQA_ANNOTATORS - slips) + [
      wrong[k] for k in rng.integers(len(wrong), size=slips)]
  return {"image": image, "question": question,
          "answers": [answers[k] for k in rng.permutation(len(answers))]}


def ve_example(rng: np.random.Generator) -> dict:
  """A scene, a hypothesis and its VE_LABELS index: a true claim (entailment), a false one of the
  same form (contradiction) or one the image cannot decide about a present group (neutral)."""
  groups, where = _scene(rng)
  image = _draw(groups, where, rng)
  label = int(rng.integers(len(VE_LABELS)))
  colours = {g["colour"] for g in groups}
  # Claims on every shape's colour only where they can be true, so the form does not tell the label.
  whole = len(colours) == 1 and rng.random() < 0.3
  if VE_LABELS[label] == "neutral":
    g = groups[rng.integers(len(groups))]
    plural = g["count"] > 1
    noun = g["shape"] + ("s" if plural else "")
    hypothesis = f"the {g['colour']} {noun} {_NEUTRAL[rng.integers(len(_NEUTRAL))][int(plural)]}"
  elif whole:
    colour = next(iter(colours))
    if VE_LABELS[label] == "contradiction":
      others = [c for c in COLOURS if c != colour]
      colour = others[rng.integers(len(others))]
    many = sum(g["count"] for g in groups) > 1
    hypothesis = f"the shapes are {colour}" if many else f"the shape is {colour}"
  else:
    hypothesis = _claim(rng, groups, VE_LABELS[label] == "entailment")
  return {"image": image, "hypothesis": hypothesis, "label": label}


def scene_json(groups: list[dict], where: str | None) -> str:
  return json.dumps({"groups": groups, "where": where}, sort_keys=True)


def scene_from_json(text: str | bytes) -> tuple[list[dict], str | None]:
  value = json.loads(text)
  return value["groups"], value["where"]


def parse_caption(text: str) -> tuple[list[dict], str | None]:
  """The groups a caption states ([{count, size or None, colour, shape}]) and its position phrase
  (or None): "two small red circles and a blue square" -> two groups. Words outside the corpus's
  grammar are ignored; a caption that names no colour-shape pair states no group."""
  words = re.findall(r"[a-z]+", text.lower())
  groups = []
  for i in range(1, len(words)):
    shape = words[i][:-1] if words[i].endswith("s") else words[i]
    if shape not in SHAPES or words[i - 1] not in COLOURS:
      continue
    before = words[max(0, i - 3):i - 1]
    size = before[-1] if before and before[-1] in _RADIUS else None
    counts = [w for w in before if w in _COUNT_VALUES]
    count = _COUNT_VALUES[counts[-1]] if counts else (2 if shape != words[i] else 1)
    groups.append(dict(count=count, size=size, colour=words[i - 1], shape=shape))
  joined = " ".join(words)
  where = next((w for w in _POSITIONS if joined.endswith(w)), None)
  return groups, where


def caption_fits(text: str, scene: tuple[list[dict], str | None]) -> bool:
  """Whether a caption is true of a scene: it names every group with its count, colour and shape,
  and any size or position it states is the scene's (what a clean caption of it does)."""
  stated, where = parse_caption(text)
  return bool(stated) and _fits(stated, where, scene)


def human_example(rng: np.random.Generator) -> dict:
  """A scene and one clean caption in one of the retrieval captions' phrasings."""
  groups, where = _scene(rng)
  image = _draw(groups, where, rng)
  options = [(True, True), (True, False), (False, True), (False, False)] if where else [
      (True, False), (False, False)]
  variants = _caption_variants(groups, where, options)
  return {"image": image, "caption": variants[rng.integers(len(variants))],
          "scene": scene_json(groups, where)}


def web_example(rng: np.random.Generator) -> dict:
  """A scene and an alt-text-like caption: clean, or corrupted as WEB_NOISE draws."""
  groups, where = _scene(rng)
  image = _draw(groups, where, rng)
  draw, noise = rng.random(), "clean"
  for kind, share in WEB_NOISE.items():
    if draw < share:
      noise = kind
      break
    draw -= share
  if noise == "mismatched":
    while True:  # another scene's caption, never one that happens to be true of this one
      other = _scene(rng)
      caption = _PREFIXES[rng.integers(len(_PREFIXES))] + _describe(*other)
      if not caption_fits(caption, (groups, where)):
        break
  elif noise == "partly_wrong":  # one group's colour or shape changed to one the scene lacks
    k = int(rng.integers(len(groups)))
    present = {(g["colour"], g["shape"]) for g in groups}
    change_colour = rng.random() < 0.5
    while True:
      colour = list(COLOURS)[rng.integers(len(COLOURS))] if change_colour else groups[k]["colour"]
      shape = groups[k]["shape"] if change_colour else SHAPES[rng.integers(len(SHAPES))]
      if (colour, shape) not in present:
        break
    changed = [dict(g, colour=colour, shape=shape) if j == k else g for j, g in enumerate(groups)]
    caption = _PREFIXES[rng.integers(len(_PREFIXES))] + _describe(changed, where)
  elif noise == "uninformative":
    caption = _UNINFORMATIVE[rng.integers(len(_UNINFORMATIVE))].format(rng.integers(100, 10000))
  else:
    caption = _PREFIXES[rng.integers(len(_PREFIXES))] + _describe(groups, where)
  return {"image": image, "caption": caption, "noise": noise,
          "scene": scene_json(groups, where)}


_EXAMPLES = {"paired": paired_example, "image": image_example, "text_pairs": text_pair_example,
             "vqa": vqa_example, "ve": ve_example, "human": human_example,
             "web": web_example}


def spoken_scenes(split: str, size: int, unseen: frozenset = frozenset()) -> list[dict]:
  """The spoken part's records before synthesis: a scene (image, caption) and a speaker
  ({name, rate, pitch}) each; captions in `unseen` (the train split's, for test) and repeats
  within a test split are drawn again, so that held-out captions are never trained on."""
  rng = np.random.default_rng([_SEED, PARTS.index("spoken"), SPLITS.index(split)])
  out, seen = [], set(unseen)
  while len(out) < size:
    example, groups, where = _paired_scene(rng)
    example.update(scene=scene_json(groups, where), label=scene_label(groups))
    voice = {"name": VOICES[int(rng.integers(len(VOICES)))],
             "rate": int(rng.integers(SPOKEN_RATES[0], SPOKEN_RATES[1] + 1)),
             "pitch": int(rng.integers(SPOKEN_PITCHES[0], SPOKEN_PITCHES[1] + 1))}
    if split == "test":
      if example["caption"] in seen:
        continue
      seen.add(example["caption"])
    out.append(dict(example, voice=voice))
  return out


def speak(items: list[tuple[str, dict]], workers: int = 0) -> list[bytes]:
  """16 kHz mono FLAC of each (caption, voice dict), synthesized SPEECH_CHUNK at a time, each
  chunk in a fresh eSpeak NG process (`workers` at once; 0: the CPUs): the bytes depend only on
  the items, never on the number of workers."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  import soundfile  # pylint: disable=import-outside-toplevel
  import soxr  # pylint: disable=import-outside-toplevel

  from flava_jax.data import speech  # pylint: disable=import-outside-toplevel
  voiced = [(text, speech.Voice(v["name"], v["rate"], v["pitch"])) for text, v in items]
  chunks = [voiced[i:i + SPEECH_CHUNK] for i in range(0, len(voiced), SPEECH_CHUNK)]
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(speech.synthesize_int16, chunks))
  out = []
  for waves, rate in results:
    for wave in waves:
      resampled = soxr.resample(wave.astype(np.float32) / 32768.0, rate, AUDIO_RATE)
      buffer = io.BytesIO()
      soundfile.write(buffer, np.clip(resampled, -1.0, 1.0), AUDIO_RATE, format="FLAC",
                      subtype="PCM_16")
      out.append(buffer.getvalue())
  return out


def spoken_records(sizes: dict | None = None) -> dict[str, list[dict]]:
  """{split: records} of the spoken part (`sizes`: {split: records}, default SIZES')."""
  sizes = sizes or {s: SIZES[("spoken", s)] for s in splits("spoken")}
  train = spoken_scenes("train", sizes["train"])
  test = spoken_scenes("test", sizes["test"], frozenset(e["caption"] for e in train))
  out = {}
  for split, examples in (("train", train), ("test", test)):
    audio = speak([(e["caption"], e["voice"]) for e in examples])
    out[split] = [dict(e, audio=a, voice=json.dumps(e["voice"], sort_keys=True),
                       id=f"spoken/{split}/{i}")
                  for i, (e, a) in enumerate(zip(examples, audio))]
  return out


def build_spoken(out_dir: str, sizes: dict | None = None) -> None:
  """Writes the spoken part's splits into out_dir (two builds are byte-identical)."""
  for split, examples in spoken_records(sizes).items():
    with records.ShardWriter(os.path.join(out_dir, f"spoken-{split}")) as shards:
      for example in examples:
        shards.write(example)
  with open(os.path.join(out_dir, "done.json"), "w") as f:
    json.dump({"version": SPOKEN_VERSION, "voices": list(VOICES)}, f)


def spoken_dir(cache_dir: str = "") -> str:
  return os.path.join(cache_dir or default_cache_dir(), f"spoken-v{SPOKEN_VERSION}")


def ensure_spoken(cache_dir: str = "") -> str:
  """The spoken part's folder, built first if absent (atomically, as `ensure`)."""
  return _ensure(spoken_dir(cache_dir), "done.json", build_spoken)


def splits(part: str) -> tuple[str, ...]:
  """The splits of one part (every part has test; retrieval has no train)."""
  if part not in PARTS:
    raise ValueError(f"the embedded corpus has parts {PARTS}, not {part!r}")
  return SPLITS if part == "text" else tuple(s for s in SPLITS if (part, s) in SIZES)


def _part_records(part: str, split: str) -> list[dict]:
  if part == "text":
    chunks = text_examples()
    keep = (lambda i: i % 10 == 9) if split == "test" else (lambda i: i % 10 != 9)
    return [{"text": c, "id": f"text/{i}"} for i, c in enumerate(chunks) if keep(i)]
  rng = np.random.default_rng([_SEED, PARTS.index(part), SPLITS.index(split)])
  size = SIZES[(part, split)]
  if part == "retrieval":
    examples = retrieval_examples(rng, size)
  else:
    examples, seen = [], set()
    while len(examples) < size:
      example = _EXAMPLES[part](rng)
      if split == "test" and part == "paired":  # one right answer per retrieval query
        if example["caption"] in seen:
          continue
        seen.add(example["caption"])
      examples.append(example)
  return [dict(e, id=f"{part}/{split}/{i}") for i, e in enumerate(examples)]


def _texts(example: dict) -> list[str]:
  """The texts of a training record, for the vocabulary."""
  texts = [example.get(k) for k in ("caption", "text", "text_pair", "question", "hypothesis")]
  return [t for t in texts if t] + list(example.get("answers", ()))


def build(out_dir: str) -> None:
  """Writes every part and split, the class and answer names and the vocabulary into out_dir."""
  for part in PARTS:
    if part in LAZY_PARTS:
      continue
    for split in splits(part):
      examples = _part_records(part, split)
      with records.ShardWriter(os.path.join(out_dir, f"{part}-{split}")) as shards:
        for example in examples:
          shards.write(example)
  with open(os.path.join(out_dir, "classes.json"), "w") as f:
    json.dump(list(CLASS_NAMES), f)
  with open(os.path.join(out_dir, "vqa_answers.json"), "w") as f:
    json.dump(list(VQA_ANSWERS), f)
  shutil.copyfile(KEPT_VOCAB, os.path.join(out_dir, "vocab.txt"))


def vocab_texts() -> list[str]:
  """The texts the kept vocabulary was trained on (train_vocab retrains it; see the docstring)."""
  texts = []
  for part in VOCAB_PARTS:
    if "train" in splits(part):
      texts += [t for e in _part_records(part, "train") for t in _texts(e)]
  return texts + [f"a photo of a {name}" for name in CLASS_NAMES]


def train_vocab(out_file: str) -> str:
  """Trains the vocabulary again (same tokens; ids may differ where the trainer breaks ties)."""
  return tokenizer.train_wordpiece(vocab_texts(), VOCAB_SIZE, out_file)


def ensure(cache_dir: str = "") -> str:
  """The corpus directory, built first if absent (atomically: concurrent callers are safe)."""
  return _ensure(corpus_dir(cache_dir), "vocab.txt", build)


def _ensure(final: str, marker: str, build_into) -> str:
  """`final`, built by build_into(staging) and renamed into place unless `marker` is there."""
  if os.path.isfile(os.path.join(final, marker)):
    return final
  os.makedirs(os.path.dirname(final), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(final) + ".", dir=os.path.dirname(final))
  try:
    build_into(staging)
    try:
      os.rename(staging, final)
    except OSError:  # another process finished first; its copy is identical
      if not os.path.isfile(os.path.join(final, marker)):
        raise
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return final


def shard_pattern(part: str, split: str, cache_dir: str = "") -> str:
  available = splits(part)
  if split not in available:
    raise ValueError(f"the embedded corpus's {part} part has splits {available}, not {split!r}")
  folder = ensure_spoken(cache_dir) if part in LAZY_PARTS else ensure(cache_dir)
  return os.path.join(folder, f"{part}-{split}-*{records.SHARD_SUFFIX}")


def vocab_file(cache_dir: str = "") -> str:
  return os.path.join(ensure(cache_dir), "vocab.txt")


def class_names() -> tuple[str, ...]:
  return CLASS_NAMES


def vqa_answers() -> tuple[str, ...]:
  return VQA_ANSWERS
