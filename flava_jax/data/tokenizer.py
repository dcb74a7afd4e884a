"""BERT-style WordPiece tokenisation from a local vocab file (never downloaded).

Real runs name bert-base-uncased's vocab.txt (what FLAVA uses) by path; the embedded corpus trains
its own small vocabulary with `train_wordpiece`. Sequences are [CLS] text [SEP], truncated and
right-padded with [PAD] to a fixed length, with an attention mask and the first piece of each word
marked (for whole-word masking); sentence pairs are [CLS] a [SEP] b [SEP] with token types 0 / 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
  """A WordPiece tokenizer over `vocab_file`; pickles by path (grain workers rebuild it)."""

  def __init__(self, vocab_file: str, lowercase: bool = True):
    vocab_file = os.path.expanduser(vocab_file)
    if not os.path.isfile(vocab_file):
      raise FileNotFoundError(f"WordPiece vocab file {vocab_file!r} does not exist")
    self.vocab_file = vocab_file
    self.lowercase = lowercase
    self._by_length = {}
    tok = self._make()
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"vocab file {vocab_file} lacks the special tokens {missing}")
    self.vocab_size = tok.get_vocab_size()
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in SPECIAL_TOKENS)
    self.special_ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

  def _make(self):
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    return BertWordPieceTokenizer(self.vocab_file, lowercase=self.lowercase)

  def _for_length(self, length: int):
    tok = self._by_length.get(length)
    if tok is None:
      tok = self._make()
      tok.enable_truncation(length)
      tok.enable_padding(length=length, pad_id=self.pad_id, pad_token="[PAD]")
      self._by_length[length] = tok
    return tok

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [L] int32, attention_mask [L] int32, word_starts [L] bool) for one text."""
    enc = self._for_length(length).encode(text)
    ids = np.asarray(enc.ids, np.int32)
    mask = np.asarray(enc.attention_mask, np.int32)
    words = np.asarray([-1 if w is None else w for w in enc.word_ids], np.int64)
    special = np.asarray(enc.special_tokens_mask, bool)
    previous = np.concatenate([[-1], words[:-1]])
    word_starts = (words >= 0) & (words != previous) & ~special
    return ids, mask, word_starts

  def encode_pair(self, text: str, text_pair: str, length: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [L] int32, attention_mask [L] int32, token_type_ids [L] int32) for BERT's sentence
    pairs: [CLS] text [SEP] text_pair [SEP], types 0 up to the first [SEP] and 1 after it (0 on
    padding); the longer text is cut first when the pair exceeds `length`."""
    enc = self._for_length(length).encode(text, text_pair)
    return (np.asarray(enc.ids, np.int32), np.asarray(enc.attention_mask, np.int32),
            np.asarray(enc.type_ids, np.int32))

  def decode(self, ids: Iterable[int]) -> str:
    return self._make().decode([int(i) for i in ids])

  def __getstate__(self):
    return {"vocab_file": self.vocab_file, "lowercase": self.lowercase}

  def __setstate__(self, state):
    self.__init__(state["vocab_file"], state["lowercase"])


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_file: str) -> str:
  """Trains a lowercase WordPiece vocabulary on `texts` and writes it as a BERT vocab.txt."""
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
  tok = BertWordPieceTokenizer(lowercase=True)
  tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                          special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
  with open(out_file, "w", encoding="utf-8") as f:
    f.write("".join(token + "\n" for token, _ in vocab))
  return out_file
