"""The shard builder's audio kinds (--kind=audio, --kind=trimodal): every kind of bad audio
skipped by its reason, repairable audio repaired and stored as 16 kHz mono FLAC, good audio
stored as the original bytes; captions JSONL, CSV and WebDataset tars; whole-command errors."""

import io
import json
import os

import numpy as np
import pytest
import soundfile

from flava_jax.data import audio, build as B, sources
from tests.data.test_build import _by_id, _image, _put, _tar

SECONDS = 0.3  # every wave is short: the whole file runs in a few seconds
MAX_SECONDS = 1.0


def _encode(wave, rate, fmt="WAV", subtype=None) -> bytes:
  out = io.BytesIO()
  soundfile.write(out, wave, rate, format=fmt, subtype=subtype)
  return out.getvalue()


def _tone(rate, seconds=SECONDS, channels=1, freq=440.0):
  t = np.arange(int(seconds * rate)) / rate
  wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _half(data: bytes) -> bytes:
  return data[:len(data) // 2]


# name -> (file bytes, None for no file; what the builder does: "ok", a repair list, or a skip
# reason). The reasons of the cut FLAC and OGG files are what decode_audio says for them.
def _audio_files() -> dict[str, tuple[bytes | None, object]]:
  return {
      "good.wav": (_encode(_tone(16000), 16000, subtype="PCM_16"), "ok"),
      "good.flac": (_encode(_tone(16000, freq=300.0), 16000, "FLAC"), "ok"),
      "good.ogg": (_encode(_tone(16000, freq=500.0), 16000, "OGG", "VORBIS"), "ok"),
      "rate44k.wav": (_encode(_tone(44100), 44100, subtype="PCM_16"), ["resampled"]),
      "stereo.wav": (_encode(_tone(16000, channels=2), 16000, subtype="PCM_16"), ["downmixed"]),
      "stereo22k.wav": (_encode(_tone(22050, channels=2), 22050, subtype="PCM_16"),
                        ["downmixed", "resampled"]),
      "cut.wav": (_half(_encode(_tone(16000), 16000, subtype="PCM_16")), ["truncated"]),
      "empty.wav": (b"", "empty_audio"),
      "noise.wav": (np.random.default_rng(0).bytes(3000), "undecodable_audio"),
      "cut.flac": (_half(_encode(_tone(16000), 16000, "FLAC")), "truncated_audio"),
      "cut.ogg": (_half(_encode(_tone(16000), 16000, "OGG", "VORBIS")), "undecodable_audio"),
      "silent.wav": (_encode(np.zeros(4800, np.float32), 16000), "silent_audio"),
      "long.flac": (_encode(_tone(16000, seconds=1.5), 16000, "FLAC"), "audio_too_long"),
      "gone.wav": (None, "missing_audio"),
  }


def _corpus(root) -> tuple[dict[str, tuple[str, bytes | None, object]], dict[str, bytes]]:
  """root/rows.jsonl (trimodal rows: image, caption, audio) over root/images and root/audio.
  Returns ({row id: (audio name, audio bytes, outcome)}, {image name: bytes})."""
  images = {f"i{i}.png": _put(root / f"images/i{i}.png", _image(i, "PNG", size=8))
            for i in range(3)}
  rows, lines = {}, []
  for number, (name, (data, outcome)) in enumerate(_audio_files().items(), 1):
    if data is not None:
      _put(root / f"audio/{name}", data)
    image = f"images/i{number % 3}.png"
    lines.append(json.dumps({"image": image, "caption": f"caption of {name}",
                             "audio": f"audio/{name}"}))
    rows[f"rows.jsonl:{number}"] = (name, data, outcome)
  _put(root / "rows.jsonl", "\n".join(lines) + "\n")
  return rows, images


def _check(summary, records: dict[str, dict], rows) -> None:
  """Every good and repaired row written (repaired ones as 16 kHz mono FLAC of the repaired
  wave, good ones as the original bytes), every bad one counted under its reason."""
  written = {i for i, (_, _, outcome) in rows.items() if not isinstance(outcome, str)
             or outcome == "ok"}
  assert set(records) == written and summary.written == len(written)
  skipped: dict[str, list[str]] = {}
  repaired: dict[str, list[str]] = {}
  for row_id, (name, data, outcome) in rows.items():
    if isinstance(outcome, str) and outcome != "ok":
      skipped.setdefault(outcome, []).append(row_id)
      continue
    record = records[row_id]
    assert record["caption"] == f"caption of {name}"
    if outcome == "ok":
      assert record["audio"] == data, name  # unchanged
      continue
    for repair in outcome:
      repaired.setdefault(repair, []).append(row_id)
    expected, repairs = audio.decode_audio(data)
    assert repairs == outcome
    info = soundfile.info(io.BytesIO(record["audio"]))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
        "FLAC", "PCM_16", 16000, 1), name
    stored, again = audio.decode_audio(record["audio"])
    assert again == [] and len(stored) == len(expected) == info.frames, name
    np.testing.assert_allclose(stored, expected, atol=2 / 32768)  # what was checked, in 16 bits
  assert summary.skipped == {reason: len(ids) for reason, ids in skipped.items()}
  assert summary.skip_examples == skipped
  assert summary.repaired == {repair: len(ids) for repair, ids in repaired.items()}
  assert summary.repair_examples == repaired
  assert summary.repaired_total == sum(isinstance(o, list) for _, _, o in rows.values())


def test_trimodal_and_audio_builds_repair_or_skip_every_bad_audio(tmp_path):
  rows, images = _corpus(tmp_path)
  summary = B.build("trimodal", str(tmp_path / "rows.jsonl"), str(tmp_path / "out"),
                    num_shards=3, max_audio_seconds=MAX_SECONDS)
  trimodal_paths = summary.paths
  records = _by_id(summary.paths)
  _check(summary, records, rows)
  assert rows["rows.jsonl:7"][0] == "cut.wav"  # about half of its 4800 samples are there
  assert 2300 < len(audio.decode_audio(records["rows.jsonl:7"]["audio"])[0]) < 2500
  for row_id, record in records.items():
    assert set(record) == {"image", "caption", "audio", "id"}
    assert record["image"] == images[f"i{int(row_id.split(':')[1]) % 3}.png"]
  written = json.loads((tmp_path / "out/trimodal.summary.json").read_text())
  assert written["repaired"] == dict(summary.repaired) and written["repaired_total"] == 4
  assert written["repair_examples"] == summary.repair_examples
  assert written["options"]["max_audio_seconds"] == MAX_SECONDS
  text = summary.format()
  assert ("repaired 4 examples: downmixed 2 (e.g. rows.jsonl:5, rows.jsonl:6), resampled 2 "
          "(e.g. rows.jsonl:4, rows.jsonl:6), truncated 1 (e.g. rows.jsonl:7)") in text
  for reason in summary.skipped:
    assert reason in text

  # The same rows as --kind=audio: the image field is not read.
  os.remove(tmp_path / "images/i0.png")
  summary = B.build("audio", str(tmp_path / "rows.jsonl"), str(tmp_path / "out"),
                    max_audio_seconds=MAX_SECONDS)
  records = _by_id(summary.paths)
  _check(summary, records, rows)
  assert all(set(r) == {"caption", "audio", "id"} for r in records.values())
  # Both kinds in one folder: a reader of each kind takes its own shards.
  assert len(trimodal_paths) == 3 and len(summary.paths) == 1
  assert sources.folder_shards(str(tmp_path / "out"), "trimodal", "paths") == trimodal_paths
  assert sources.folder_shards(str(tmp_path / "out"), "audio", "paths") == summary.paths
  with pytest.raises(ValueError, match="audio shards.*trimodal shards.*no paired shards"):
    sources.folder_shards(str(tmp_path / "out"), "paired", "paths")


def test_audio_csv_with_named_columns_and_a_bad_caption(tmp_path):
  rows, _ = _corpus(tmp_path)
  names = {name: (data, outcome) for name, data, outcome in rows.values()}
  table = [("path", "transcript"), ("audio/good.flac", "a good one"),
           ("audio/stereo.wav", "a stereo one"), ("audio/empty.wav", "an empty one"),
           ("audio/good.wav", "   "), ("audio/gone.wav", "gone"), ("", "no path")]
  _put(tmp_path / "speech.csv", "\n".join(",".join(r) for r in table) + "\n")
  summary = B.build("audio", str(tmp_path / "speech.csv"), str(tmp_path / "out"),
                    audio_field="path", caption_field="transcript")
  records = _by_id(summary.paths)
  assert {k: r["caption"] for k, r in records.items()} == {"speech.csv:2": "a good one",
                                                            "speech.csv:3": "a stereo one"}
  assert records["speech.csv:2"]["audio"] == names["good.flac"][0]
  assert summary.repaired == {"downmixed": 1} and summary.repaired_total == 1
  # the caption is checked first: a blank one skips the row without reading its audio
  assert summary.skip_examples == {"empty_audio": ["speech.csv:4"], "empty_text": ["speech.csv:5"],
                                   "missing_audio": ["speech.csv:6", "speech.csv:7"]}


def test_audio_webdataset_tars(tmp_path):
  wav, flac = _encode(_tone(16000), 16000), _encode(_tone(16000), 16000, "FLAC")
  png = _image(0, "PNG", size=8)
  _tar(tmp_path / "shards/s0.tar", {"a/01.wav": wav, "a/01.txt": b"one",
                                    "a/02.flac": flac, "a/02.json": b'{"caption": "two"}',
                                    "a/02.png": png, "a/03.txt": b"no audio",
                                    "a/04.mp3": b"", "a/04.txt": b"empty"})
  summary = B.build("audio", str(tmp_path / "shards"), str(tmp_path / "out"))
  assert {k: (r["audio"], r["caption"]) for k, r in _by_id(summary.paths).items()} == {
      "s0.tar/a/01": (wav, "one"), "s0.tar/a/02": (flac, "two")}
  assert summary.skipped == {"missing_audio": 1, "empty_audio": 1}
  summary = B.build("trimodal", str(tmp_path / "shards"), str(tmp_path / "out"),
                    prefix="tri")
  assert {k: (r["image"], r["audio"]) for k, r in _by_id(summary.paths).items()} == {
      "s0.tar/a/02": (png, flac)}
  assert summary.skipped == {"missing_image": 3}


@pytest.mark.parametrize("kind,files,given,kwargs,message", [
    ("audio", {"s.csv": b"path,caption\n"}, "s.csv", {},
     r"no column 'audio' .*--caption_field/--audio_field"),
    ("trimodal", {"s.csv": b"audio,text\n"}, "s.csv", {"caption_field": "text"},
     r"no column 'image' .*--image_field/--caption_field/--audio_field"),
    ("trimodal", {"s.tsv": b"image\taudio\n"}, "s.tsv", {}, r"no column 'caption'"),
    ("audio", {"a.wav": b"RIFF"}, "a.wav", {}, r"--kind=audio cannot read .* an audio file"),
    ("trimodal", {"a/x.wav": b"RIFF"}, "a", {}, r"holds no captions file .*--kind=trimodal"),
    ("text", {"s.csv": b"a\n"}, "s.csv", {}, r"a captions table \(--kind=paired, audio or "),
    ("audio", {"s.jsonl": b'{"wav": "x.wav", "caption": "c"}\n'}, "s.jsonl", {},
     r"nothing written(.|\n)*missing_audio(.|\n)*--audio_field=audio --caption_field=caption"),
    ("audio", {"s.jsonl": b"{}\n"}, "s.jsonl", {"max_audio_seconds": 0}, "must be positive"),
])
def test_whole_command_errors(tmp_path, kind, files, given, kwargs, message):
  for name, data in files.items():
    _put(tmp_path / name, data)
  with pytest.raises(B.BuildError, match=message):
    B.build(kind, str(tmp_path / given), str(tmp_path / "out"), **kwargs)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
