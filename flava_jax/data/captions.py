"""Caption cleaning as BLIP's reference does it before tokenising (its `pre_caption`).

The rules, in order: lowercase; each of the characters . ! " ( ) * # : ; ~ becomes a space; a run
of two or more white-space characters becomes one space; a trailing newline and then spaces at
both ends are removed; the result is cut to its first `max_words` space-separated words.
Other punctuation (commas, apostrophes, hyphens, slashes, question marks) is kept, as in the
reference. BLIP pretraining and its COCO/Flickr recipes use max_words=30.
"""

from __future__ import annotations

import re

# The characters the reference replaces by a space (a regex character class).
PUNCTUATION = ".!\"()*#:;~"
_PUNCTUATION_RE = re.compile("[" + re.escape(PUNCTUATION) + "]")
_SPACE_RUN_RE = re.compile(r"\s{2,}")


def truncate_words(text: str, max_words: int) -> str:
  """The first `max_words` words of `text` split on single spaces (0 or less: no cut)."""
  if max_words <= 0:
    return text
  words = text.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else text


def clean_caption(text: str, max_words: int = 30) -> str:
  """A caption as BLIP trains on it: lowercased, punctuation spaced out, runs of white space
  collapsed, ends stripped, cut to `max_words` words (0: no cut). May return ''."""
  text = _PUNCTUATION_RE.sub(" ", text.lower())
  text = _SPACE_RUN_RE.sub(" ", text)
  text = text.rstrip("\n").strip(" ")
  return truncate_words(text, max_words)
