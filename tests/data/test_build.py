"""The shard builder: every input format, bad examples counted by reason, whole-command errors."""

import io
import json
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from flava_jax.data import build as B
from flava_jax.data.records import decode_record
from tests.processes import REPO


def _image(seed: int, fmt: str = "JPEG", size: int = 16) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, fmt)
  return buf.getvalue()


def _put(path, data: bytes | str) -> bytes:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = data.encode() if isinstance(data, str) else data
  with open(path, "wb") as f:
    f.write(data)
  return data


def _records(paths) -> list[dict]:
  source = grain.sources.ArrayRecordDataSource(list(paths))
  return [decode_record(source[i]) for i in range(len(source))]


def _by_id(paths) -> dict[str, dict]:
  return {r["id"]: r for r in _records(paths)}


def _tar(path, members: dict[str, bytes]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# Every input format.


def test_image_folder_with_classes(tmp_path):
  root = tmp_path / "train"
  images = {"cat/a.jpg": _put(root / "cat/a.jpg", _image(0)),
            "cat/sub/b.PNG": _put(root / "cat/sub/b.PNG", _image(1, "PNG")),
            "dog/c.jpeg": _put(root / "dog/c.jpeg", _image(2)),
            "emu/d.webp": _put(root / "emu/d.webp", _image(3, "WEBP"))}
  _put(root / "dog/notes.txt", "not an image")
  _put(root / ".hidden/e.jpg", _image(4))
  summary = B.build("image", str(root), str(tmp_path / "out"), num_shards=3)
  assert summary.written == 4 and not summary.skipped
  assert summary.classes == ["cat", "dog", "emu"]
  assert summary.ignored == {"non_image_files": 1}
  assert len(summary.paths) == 3
  records = _by_id(summary.paths)
  assert set(records) == set(images)
  for name, record in records.items():
    assert record["image"] == images[name]  # original bytes, not re-encoded
    assert record["label"] == ["cat", "dog", "emu"].index(name.split("/")[0])
  assert json.loads((tmp_path / "out/image.classes.json").read_text()) == ["cat", "dog", "emu"]
  written = json.loads((tmp_path / "out/image.summary.json").read_text())
  assert written["written"] == 4 and written["classes"] == ["cat", "dog", "emu"]
  assert written["shards"] == [os.path.basename(p) for p in summary.paths]
  # Round-robin in sorted order: the first shard holds the 1st and 4th examples.
  assert [r["id"] for r in _records(summary.paths[:1])] == ["cat/a.jpg", "emu/d.webp"]


def test_flat_image_folder_has_no_labels(tmp_path):
  a = _put(tmp_path / "imgs/a.jpg", _image(0))
  b = _put(tmp_path / "imgs/b.gif", _image(1, "GIF"))
  summary = B.build("image", str(tmp_path / "imgs"), str(tmp_path / "out"), prefix="flat")
  assert summary.classes is None and summary.written == 2
  assert summary.paths == [str(tmp_path / "out/flat-00000-of-00001.array_record")]
  assert _records(summary.paths) == [{"image": a, "id": "a.jpg"}, {"image": b, "id": "b.gif"}]
  assert not (tmp_path / "out/flat.classes.json").exists()


def _caption_rows(tmp_path):
  """(image path as written in the captions file, caption, image bytes)."""
  a = _put(tmp_path / "data/images/a.jpg", _image(0))
  b = _put(tmp_path / "elsewhere/b.png", _image(1, "PNG"))
  return [("images/a.jpg", "a red square", a),
          (str(tmp_path / "elsewhere/b.png"), "  two\tblue  dots ", b)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_captions_file(tmp_path, fmt):
  rows = _caption_rows(tmp_path)
  path = tmp_path / f"data/captions.{fmt}"
  if fmt == "jsonl":
    _put(path, "".join(json.dumps({"img": i, "text": c, "other": 1}) + "\n" for i, c, _ in rows))
  else:
    sep = "," if fmt == "csv" else "\t"
    _put(path, "\n".join([f"text{sep}img"] + [f'"{c}"{sep}{i}' for i, c, _ in rows]) + "\n")
  summary = B.build("paired", [str(path)], str(tmp_path / "out"), image_field="img",
                    caption_field="text")
  assert summary.written == 2 and not summary.skipped
  records = _records(summary.paths)
  assert [r["caption"] for r in records] == ["a red square", "two blue dots"]
  assert [r["image"] for r in records] == [rows[0][2], rows[1][2]]
  assert [r["id"] for r in records] == [f"captions.{fmt}:{n}" for n in (
      (1, 2) if fmt == "jsonl" else (2, 3))]


def test_paired_webdataset_tars(tmp_path):
  a, b, c = _image(0), _image(1, "PNG"), _image(2)
  _tar(tmp_path / "shards/s0.tar", {"x/0001.jpg": a, "x/0001.txt": b"a cat",
                                    "x/0002.png": b, "x/0002.json": b'{"caption": "a dog"}',
                                    "x/0003.jpg": c})  # no caption: missing_text
  _tar(tmp_path / "shards/s1.tar", {"0004.txt": b"no image here", "0005.jpg": c,
                                    "0005.json": b'{"caption": "an emu", "w": 16}',
                                    "0005.txt": b"txt wins over json"})
  summary = B.build("paired", str(tmp_path / "shards"), str(tmp_path / "out"), num_shards=2)
  assert summary.written == 3
  assert summary.skipped == {"missing_text": 1, "missing_image": 1}
  records = _by_id(summary.paths)
  assert {k: (r["image"], r["caption"]) for k, r in records.items()} == {
      "s0.tar/x/0001": (a, "a cat"), "s0.tar/x/0002": (b, "a dog"),
      "s1.tar/0005": (c, "txt wins over json")}


def test_image_webdataset_tar(tmp_path):
  a, b = _image(0), _image(1, "PNG")
  _tar(tmp_path / "images.tar", {"k1.jpg": a, "k1.cls": b"3", "k2.png": b})
  summary = B.build("image", str(tmp_path / "images.tar"), str(tmp_path / "out"))
  assert _records(summary.paths) == [{"image": a, "id": "images.tar/k1"},
                                     {"image": b, "id": "images.tar/k2"}]


def test_text_files_are_joined_paragraphs(tmp_path):
  _put(tmp_path / "books/a.txt", "Title\n\nFirst paragraph of\nthe book.\n\n\n  \nShort.\n\n"
       "A long paragraph that is split at lines\nsecond line of it\nthird line\n")
  _put(tmp_path / "books/sub/b.txt", "\ufeffOnly one.\n")
  _put(tmp_path / "books/cover.png", _image(0, "PNG"))
  summary = B.build("text", str(tmp_path / "books"), str(tmp_path / "out"), text_chars=30)
  assert summary.ignored == {"non_text_files": 1}
  assert [(r["id"], r["text"]) for r in _records(summary.paths)] == [
      ("a.txt#0", "Title First paragraph of the book."),
      # a line longer than the target is split too, between words
      ("a.txt#1", "Short. A long paragraph that is"),
      ("a.txt#2", "split at lines second line of it"),
      ("a.txt#3", "third line"),
      ("sub/b.txt#0", "Only one.")]


def test_text_chunks_reach_the_target():
  paragraphs = [["x" * 10]] * 7
  assert [len(c) for c in B.text_chunks(paragraphs, 25)] == [34, 34, 10]


def test_text_jsonl(tmp_path):
  _put(tmp_path / "docs.jsonl", '{"body": "one document"}\n\n{"body": " two "}\n{"id": 3}\n')
  summary = B.build("text", str(tmp_path / "docs.jsonl"), str(tmp_path / "out"),
                    text_field="body")
  assert summary.skipped == {"missing_text": 1}
  assert _records(summary.paths) == [{"text": "one document", "id": "docs.jsonl:1"},
                                     {"text": "two", "id": "docs.jsonl:3"}]


# ---------------------------------------------------------------------------------------------
# Bad examples are skipped and counted, good ones all written.


def _bad_corpus(tmp_path) -> dict[str, bytes]:
  """An image folder and captions.jsonl seeded with one bad example per reason."""
  images = tmp_path / "corpus/images"
  good = {n: _put(images / n, _image(i)) for i, n in enumerate(["g1.jpg", "g2.jpg", "g3.jpg"])}
  jpeg = _image(9, size=32)
  _put(images / "zero.jpg", b"")
  _put(images / "truncated.jpg", jpeg[: len(jpeg) * 3 // 4])
  _put(images / "garbage.jpg", b"this is not a JPEG at all")
  _put(images / "huge.png", _image(10, "PNG", size=40))  # 1600 pixels > max_pixels=1200
  lines = [json.dumps({"image": f"images/{n}", "caption": f"good {n}"}).encode() for n in good]
  lines += [json.dumps({"image": f"images/{n}", "caption": "a caption"}).encode()
            for n in ("zero.jpg", "truncated.jpg", "garbage.jpg", "huge.png", "gone.jpg")]
  lines += [b'{"image": "images/g1.jpg", "caption": "  \\t "}',
            b'{"image": "images/g1.jpg", "caption": "\xff\xfe\xfa\xfb\xfc\xfd"}',
            b'{"image": "images/g2.jpg", "caption": "caf\xe9 au lait on a wooden table"}',
            json.dumps({"image": "images/g1.jpg", "caption": "long " * 100}).encode(),
            b'{"image": "images/g1.jpg", "caption": ',
            b'["a list, not an object"]',
            b'{"image": "images/g1.jpg"}',
            b'{"caption": "no image field"}']
  _put(tmp_path / "corpus/captions.jsonl", b"\n".join(lines) + b"\n")
  return good


def test_bad_paired_examples_are_counted(tmp_path):
  good = _bad_corpus(tmp_path)
  summary = B.build("paired", str(tmp_path / "corpus/captions.jsonl"), str(tmp_path / "out"),
                    max_pixels=1200, max_text_bytes=200, num_shards=2)
  assert summary.skipped == {"empty_image": 1, "truncated_image": 1, "undecodable": 1,
                             "too_large": 1, "missing_image": 2, "empty_text": 1,
                             "non_utf8_text": 1, "text_too_long": 1, "corrupt_record": 2,
                             "missing_text": 1}
  assert summary.skip_examples["too_large"] == ["captions.jsonl:7"]
  assert summary.skip_examples["corrupt_record"] == ["captions.jsonl:13", "captions.jsonl:14"]
  records = _by_id(summary.paths)
  assert summary.written == len(records) == 4
  assert {k: (r["caption"], r["image"]) for k, r in records.items()} == {
      "captions.jsonl:1": ("good g1.jpg", good["g1.jpg"]),
      "captions.jsonl:2": ("good g2.jpg", good["g2.jpg"]),
      "captions.jsonl:3": ("good g3.jpg", good["g3.jpg"]),
      # a few bad bytes are replaced and the caption kept
      "captions.jsonl:11": ("caf\ufffd au lait on a wooden table", good["g2.jpg"])}
  written = json.loads((tmp_path / "out/paired.summary.json").read_text())
  assert written["skipped"] == dict(summary.skipped) and written["written"] == 4
  text = summary.format()
  for reason in summary.skipped:
    assert reason in text


def test_bad_images_in_a_folder_are_counted(tmp_path):
  good = _bad_corpus(tmp_path)
  summary = B.build("image", str(tmp_path / "corpus/images"), str(tmp_path / "out"),
                    max_pixels=1200)
  assert summary.skipped == {"empty_image": 1, "truncated_image": 1, "undecodable": 1,
                             "too_large": 1}
  assert {r["id"]: r["image"] for r in _records(summary.paths)} == good


# ---------------------------------------------------------------------------------------------
# Whole-command errors and the command line.


@pytest.mark.parametrize("kind,files,given,message", [
    ("paired", {}, "nope.jsonl", "input path does not exist"),
    ("paired", {"x.parquet": b""}, "x.parquet", "unknown format"),
    ("image", {"c.jsonl": b"{}"}, "c.jsonl", "--kind=image cannot"),
    ("text", {"i/a.jpg": _image(0)}, "i/a.jpg", "an image file"),
    ("paired", {"i/a.jpg": _image(0)}, "i", "is --kind=image"),
    ("paired", {"c.csv": b"file,caption\n"}, "c.csv", "no column 'image'"),
    ("image", {"i/a.jpg": b""}, "i", "nothing written"),
    ("image", {"i/a.jpg": _image(0), "i/c/b.jpg": _image(1)}, "i", "images outside them"),
])
def test_whole_command_errors(tmp_path, kind, files, given, message):
  for name, data in files.items():
    _put(tmp_path / name, data)
  with pytest.raises(B.BuildError, match=message):
    B.build(kind, str(tmp_path / given), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_existing_shards_need_overwrite(tmp_path):
  _put(tmp_path / "i/a.jpg", _image(0))
  B.build("image", str(tmp_path / "i"), str(tmp_path / "out"), num_shards=3)
  with pytest.raises(B.BuildError, match="--overwrite"):
    B.build("image", str(tmp_path / "i"), str(tmp_path / "out"))
  summary = B.build("image", str(tmp_path / "i"), str(tmp_path / "out"), overwrite=True)
  assert sorted(os.listdir(tmp_path / "out")) == ["image-00000-of-00001.array_record",
                                                  "image.summary.json"]
  assert summary.written == 1


def test_command_line(tmp_path):
  _bad_corpus(tmp_path)
  _put(tmp_path / "more.txt", "A text file given with a comma.")
  _put(tmp_path / "extra.jsonl", '{"text": "and a jsonl file"}\n{"text": ""}\n')
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, "-m", "flava_jax.data.build", "--kind=text",
       f"--input={tmp_path / 'more.txt'},{tmp_path / 'extra.jsonl'}",
       f"--out={tmp_path / 'out'}", "--num_shards=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  assert "wrote 2 text examples to 2 shards" in run.stdout
  assert "empty_text" in run.stdout and "skipped 1 example:" in run.stdout
  assert os.path.exists(tmp_path / "out/text.summary.json")
  missing = subprocess.run(
      [sys.executable, "-m", "flava_jax.data.build", "--kind=paired",
       f"--input={tmp_path / 'corpus/captions.jsonl'}", f"--input={tmp_path / 'missing.csv'}",
       f"--out={tmp_path / 'out2'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode != 0
  assert f"input path does not exist: {tmp_path / 'missing.csv'}" in missing.stderr
  assert "Traceback" not in missing.stderr


# ---------------------------------------------------------------------------------------------
# Long text is chunked, never dropped; --overwrite replaces only a finished build; --out errors.


def _sentences(n: int) -> str:
  return " ".join(f"Sentence number {i} says something about item {i * 7}." for i in range(n))


def test_split_text_cuts_at_sentences_and_words_and_loses_nothing():
  text = _sentences(40)
  pieces = B.split_text(text, 200)
  assert "".join(pieces) == text and len(pieces) > 5
  assert all(len(p) <= 200 for p in pieces)
  assert all(p.endswith(". ") for p in pieces[:-1])  # at sentence ends
  words = "word " * 100
  assert all(p.endswith(" ") for p in B.split_text(words, 33)[:-1])  # no sentence: between words
  blob = "x" * 1000  # no space at all: cut where it must be
  assert B.split_text(blob, 300) == ["x" * 300] * 3 + ["x" * 100]
  assert B.split_text("short", 300) == ["short"]
  assert list(B.text_chunks([["a" + " " * 5000 + "b"]], 2000)) == ["a", "b"]  # no blank chunk


def test_long_single_line_text_and_jsonl_documents_are_chunked(tmp_path):
  line = _sentences(2400)  # ~124 KB without a newline: over max_text_bytes as one example
  assert len(line.encode()) > B.DEFAULT_MAX_TEXT_BYTES
  _put(tmp_path / "in/book.txt", line)
  doc = "\n\n".join(_sentences(200) for _ in range(10))  # ~100 KB: a long wiki article
  _put(tmp_path / "in/wiki.jsonl", json.dumps({"text": "a short one"}) + "\n"
       + json.dumps({"text": doc}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
  summary = B.build("text", str(tmp_path / "in"), str(tmp_path / "out"))
  assert not summary.skipped
  records = _records(summary.paths)
  by_source = {}
  for r in records:
    by_source.setdefault(r["id"].rsplit("#", 1)[0] if "#" in r["id"] else r["id"], []).append(r)
  assert set(by_source) == {"book.txt", "wiki.jsonl:1", "wiki.jsonl:2", "wiki.jsonl:3"}
  assert [r["id"] for r in by_source["wiki.jsonl:1"]] == ["wiki.jsonl:1"]  # short: one example
  for name, original in (("book.txt", line), ("wiki.jsonl:2", doc)):
    chunks = [r["text"] for r in sorted(by_source[name],
                                        key=lambda r: int(r["id"].rsplit("#", 1)[1]))]
    assert len(chunks) >= len(original) // (2 * B.DEFAULT_TEXT_CHARS)
    assert all(len(c) < 2 * B.DEFAULT_TEXT_CHARS for c in chunks)
    assert " ".join(chunks) == " ".join(original.split())  # every word kept, in order
    assert all(c.endswith(".") for c in chunks)  # cut at sentence ends
  blob = sorted(by_source["wiki.jsonl:3"], key=lambda r: r["id"])  # no space: cut in the word
  assert [r["text"] for r in blob] == ["x" * 2000, "x" * 2000, "x" * 1000]


def _good_build(tmp_path):
  _put(tmp_path / "good/cat/a.jpg", _image(0))
  _put(tmp_path / "good/dog/b.jpg", _image(1))
  B.build("image", str(tmp_path / "good"), str(tmp_path / "out"), num_shards=2)
  _put(tmp_path / "out/notes.txt", "the user's own file")
  _put(tmp_path / "bad/cat/a.jpg", b"")  # the only example is bad: nothing written
  return {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}


def test_failed_overwrite_keeps_the_old_build(tmp_path):
  before = _good_build(tmp_path)
  assert len(before) == 5  # 2 shards, classes, summary, notes
  with pytest.raises(B.BuildError, match="nothing written"):
    B.build("image", str(tmp_path / "bad"), str(tmp_path / "out"), overwrite=True)
  after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
  assert after == before  # old outputs intact, no temporary leftovers


def test_overwrite_that_fails_while_moving_in_restores_the_old_build(tmp_path, monkeypatch):
  before = _good_build(tmp_path)
  _put(tmp_path / "other/a.jpg", _image(5))
  replace = os.replace

  def failing_replace(src, dst):
    if str(dst).endswith("out/image.summary.json") and "building" in str(src):
      raise OSError(28, "No space left on device")
    return replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(B.BuildError, match="old ones are kept"):
    B.build("image", str(tmp_path / "other"), str(tmp_path / "out"), overwrite=True)
  monkeypatch.undo()
  after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
  assert after == before


def test_out_that_is_a_file_or_under_a_file_is_an_error(tmp_path):
  _put(tmp_path / "i/a.jpg", _image(0))
  _put(tmp_path / "taken", "a file the user owns")
  with pytest.raises(B.BuildError, match=r"--out=.*taken is a file, not a folder"):
    B.build("image", str(tmp_path / "i"), str(tmp_path / "taken"))
  with pytest.raises(B.BuildError, match=r"cannot be created: .*taken is a file"):
    B.build("image", str(tmp_path / "i"), str(tmp_path / "taken/sub/out"))
  assert (tmp_path / "taken").read_text() == "a file the user owns"
  # A missing --out is created, and removed again when the build fails.
  with pytest.raises(B.BuildError, match="nothing written"):
    B.build("image", str(tmp_path / "i"), str(tmp_path / "new/deeper/out"), max_pixels=1)
  assert not (tmp_path / "new").exists()


def test_command_line_out_and_overwrite_errors(tmp_path):
  before = _good_build(tmp_path)
  _put(tmp_path / "taken", "a file")
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def run(*args):
    return subprocess.run([sys.executable, "-m", "flava_jax.data.build", "--kind=image", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)

  result = run(f"--input={tmp_path / 'good'}", f"--out={tmp_path / 'taken'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
  assert errors == [f"error: --out={tmp_path / 'taken'} is a file, not a folder"], result.stderr
  result = run(f"--input={tmp_path / 'bad'}", f"--out={tmp_path / 'out'}", "--overwrite")
  assert result.returncode != 0 and "error: nothing written" in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
  assert after == before
