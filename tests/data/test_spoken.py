"""The spoken embedded part (data/embedded.py): two builds are byte-identical, held-out captions
are never train captions, the audio is 16 kHz mono speech that differs between captions; and the
pipeline's audio batches (preprocess.AudioTextProcessor) have the configured shape, dtype and
mask."""

import io
import os

import numpy as np
import soundfile

from flava_jax.data import audio, embedded, pipeline, records
from flava_jax.data.tokenizer import Tokenizer

SIZES = {"train": 24, "test": 6}


def _shards(folder):
  return {name: open(os.path.join(folder, name), "rb").read()
          for name in sorted(os.listdir(folder)) if name.endswith(records.SHARD_SUFFIX)}


def test_two_builds_are_byte_identical_and_hold_out_their_test_captions(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  first.mkdir()
  second.mkdir()
  embedded.build_spoken(str(first), SIZES)
  embedded.build_spoken(str(second), SIZES)
  built = _shards(first)
  assert sorted(built) == ["spoken-test-00000-of-00001.array_record",
                           "spoken-train-00000-of-00001.array_record"]
  assert built == _shards(second)
  parts = embedded.spoken_records(SIZES)
  train, test = parts["train"], parts["test"]
  assert [len(train), len(test)] == [24, 6]
  assert not {r["caption"] for r in test} & {r["caption"] for r in train}
  assert len({r["caption"] for r in test}) == 6
  assert set(train[0]) == set(embedded.SCHEMAS["spoken"]) | {"id"}
  for record in train + test:  # the label is the class of a one-kind scene, as its caption says
    groups, _ = embedded.scene_from_json(record["scene"])
    if len(groups) == 1:
      name = embedded.CLASS_NAMES[record["label"]]
      assert name == f"{groups[0]['colour']} {groups[0]['shape']}"
      assert groups[0]["colour"] in record["caption"] and groups[0]["shape"] in record["caption"]
    else:
      assert record["label"] == -1
  assert 0 < sum(r["label"] >= 0 for r in train) < len(train)
  voices = [r["voice"] for r in train]
  assert len(set(voices)) > 12  # a speaker (voice, rate, pitch) drawn per record
  waves = []
  for record in train[:6]:
    info = soundfile.info(io.BytesIO(record["audio"]))
    assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
    wave, repairs = audio.decode_audio(record["audio"])
    assert repairs == [] and 0.8 < len(wave) / 16000 < 5.0, record["caption"]
    assert 0.05 < np.abs(wave).max() <= 1.0
    waves.append(wave)
  n = min(len(w) for w in waves[:2])
  assert np.abs(waves[0][:n] - waves[1][:n]).mean() > 0.005  # other captions, other audio


def test_the_pipeline_makes_fixed_length_audio_batches_with_masks(tmp_path):
  embedded.build_spoken(str(tmp_path), SIZES)
  cfg, corpora = pipeline.data_config(dict(
      corpora=dict(spoken=dict(kind="trimodal", source="array_record",
                               paths=str(tmp_path / "spoken-train-00000-of-00001.array_record"),
                               fields=dict(image="image", caption="caption", audio="audio"))),
      read_threads=0, audio_time_masks=2))
  samples, length = 32000, 16
  tok = Tokenizer(embedded.KEPT_VOCAB)
  processor = pipeline.audio_text_processor(cfg, "trimodal", samples, tok, length)
  data = pipeline.make_pipeline(cfg, corpora, {"trimodal": processor}, global_batch=8, seed=0)
  name, batch = next(data)
  assert name == "spoken"
  assert set(batch) == {"audio", "audio_mask", "input_ids", "attention_mask"}
  assert batch["audio"].shape == batch["audio_mask"].shape == (8, samples)
  assert batch["audio"].dtype == np.float32 and batch["audio_mask"].dtype == np.int32
  assert batch["input_ids"].shape == (8, length)
  lengths = batch["audio_mask"].sum(1)
  assert lengths.max() <= samples and lengths.min() > 0.8 * 16000
  for row, n in zip(batch["audio"], lengths):  # padding is silent, masks are prefixes
    assert np.all(row[n:] == 0)
  assert (batch["audio_mask"][:, :-1] >= batch["audio_mask"][:, 1:]).all()
  # eval: the start of each recording, no time masks, the same for two processors
  eval_proc = pipeline.audio_text_processor(cfg, "trimodal", samples, tok, length, train=False)
  source = pipeline.sources.open_source(corpora["spoken"].source_config(""), "x", "trimodal")
  row = eval_proc(source[0], np.random.default_rng(0))
  wave, _ = audio.decode_audio(source[0]["audio"])
  expected, mask = audio.crop_or_pad(wave, samples)
  np.testing.assert_array_equal(row["audio"], expected)
  np.testing.assert_array_equal(row["audio_mask"], mask)
  assert eval_proc({"caption": "a red circle", "audio": b"RIFF junk"},
                   np.random.default_rng(0)) == {"_skip": "undecodable_audio"}
