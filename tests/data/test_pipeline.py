"""The training pipeline: batch contents per kind, the mixture, determinism, iterator state,
per-host sharding, bad data counted by reason, and start-up errors."""

import collections
import io
import json

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from configs import flava
from flava_jax import experiment, sharding
from flava_jax.tasks import flava as flava_task
from flava_jax.data import mixture, pipeline, preprocess, sources
from flava_jax.losses.flava import BATCH_KEYS
from flava_jax.losses.masked import IGNORE_INDEX
from tests.data import builds, helpers


def tiny_config(**data):
  config = flava.get_config("tiny")
  for k, v in data.items():
    config.data[k] = v
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def embedded_batches():
  it = experiment.make_pipeline(tiny_config(), 0, 1)
  batches = take(it, 40)
  it.close()
  return batches


def test_batches_hold_the_keys_shapes_and_ranges_of_their_kind(embedded_batches):
  config = tiny_config()
  size = config.model.image.image_size
  grid = size // config.model.image.patch_size
  seen = set()
  for corpus, batch in embedded_batches:
    kind = corpus  # the default corpora are named after their kinds
    seen.add(kind)
    assert set(batch) == set(BATCH_KEYS[kind]) | ({"input_ids"} if kind == "paired" else set())
    assert all(len(v) == config.global_batch for v in batch.values())
    if kind != "text":
      # uint8 views; the train step normalises them (tasks/flava.model_pixels)
      assert batch["pixels"].shape[1:] == (size, size, 3) and batch["pixels"].dtype == np.uint8
      assert batch["dvae_pixels"].shape[1:] == (grid * 8, grid * 8, 3)
      assert batch["dvae_pixels"].dtype == np.uint8
      assert batch["pixels"].min() < 60 and batch["pixels"].max() > 200  # shapes on a background
      finished = flava_task.model_pixels(batch)
      assert -1.8 < finished["pixels"].min() and finished["pixels"].max() < 2.2
      assert 0.1 - 1e-6 <= finished["dvae_pixels"].min() <= finished["dvae_pixels"].max() <= 0.9 + 1e-6
      mask = batch["patch_mask"]
      assert mask.dtype == bool and mask.shape[1] == grid * grid
      assert (mask.sum(1) <= config.data.mask_patches).all() and mask.sum(1).mean() > 3
    if kind != "image":
      length = config.paired_text_length if kind == "paired" else config.text_length
      att = batch["attention_mask"]
      assert att.shape[1] == length and att.dtype == np.int32
      assert (np.diff(att, axis=1) <= 0).all()  # right padded: ones, then zeros
      labels, masked = batch["mlm_labels"], batch["input_ids_masked"]
      assert ((labels == IGNORE_INDEX) | (att == 1)).all()  # padding never chosen
      assert (masked[labels == IGNORE_INDEX] != 4).all() or kind == "text"
      if kind == "paired":
        ids = batch["input_ids"]
        assert (masked[labels == IGNORE_INDEX] == ids[labels == IGNORE_INDEX]).all()
        assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
  assert seen == {"paired", "image", "text"}
  text = [b for c, b in embedded_batches if c != "image"]
  chosen = np.mean([(b["mlm_labels"] != IGNORE_INDEX).sum() / (b["attention_mask"].sum() -
                                                                 2 * len(b["attention_mask"]))
                    for b in text])
  assert 0.08 < chosen < 0.25  # about 15% of the real tokens


def test_whole_words_are_masked_together():
  config = tiny_config()
  cfg, _ = pipeline.data_config(config.data)
  shapes = experiment.parse(config)[1].data_shapes()
  tok = pipeline.load_tokenizer(cfg, shapes)
  proc = pipeline.make_processor("paired", cfg, shapes, tok)
  caption = "a drawing of two tiny unbelievably purple diamonds"
  _, _, starts = tok.encode(caption, shapes.paired_text_length)
  assert starts.sum() < (tok.encode(caption, 16)[1].sum() - 2)  # some words have several pieces
  rng = np.random.default_rng(0)
  for _ in range(200):
    out = proc({"image": helpers.jpeg(), "caption": caption}, rng)
    chosen = out["mlm_labels"] != IGNORE_INDEX
    word = np.cumsum(starts)
    for w in np.unique(word[chosen]):
      assert chosen[(word == w) & (out["attention_mask"] == 1) &
                    (out["input_ids"] > 4)].all()


def test_mixture_frequencies_follow_the_weights():
  weights = {"image": 0.15, "paired": 0.7, "text": 0.15}
  names = sorted(weights)
  cumulative = np.cumsum([weights[n] for n in names])
  n = 20_000
  counts = collections.Counter(names[mixture.choose_corpus(0, s, cumulative)] for s in range(n))
  for name, w in weights.items():
    sigma = np.sqrt(n * w * (1 - w))
    assert abs(counts[name] - n * w) < 4 * sigma, (name, counts)


def test_pipeline_follows_the_seeded_corpus_sequence(embedded_batches):
  names = ["image", "paired", "text"]
  cumulative = np.cumsum([0.15, 0.7, 0.15])
  expected = [names[mixture.choose_corpus(0, s, cumulative)] for s in range(40)]
  assert [c for c, _ in embedded_batches] == expected


def _same(a, b):
  return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
      np.array_equal(a[1][k], b[1][k]) for k in a[1])


def test_deterministic_under_a_seed(embedded_batches):
  again = experiment.make_pipeline(tiny_config(), 0, 1)
  assert all(_same(x, y) for x, y in zip(take(again, 8), embedded_batches[:8]))
  other = tiny_config()
  other.seed = 1
  moved = take(experiment.make_pipeline(other, 0, 1), 8)
  assert not all(_same(x, y) for x, y in zip(moved, embedded_batches[:8]))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_round_trip(workers):
  config = tiny_config(worker_count=workers)
  straight = experiment.make_pipeline(config, 0, 1)
  expected = take(straight, 12)
  straight.close()
  first = experiment.make_pipeline(config, 0, 1)
  head = take(first, 5)
  state = json.loads(pipeline.state_to_json(first.get_state()))  # through JSON, as saved
  first.close()
  resumed = experiment.make_pipeline(config, 0, 1)
  resumed.set_state(state)
  tail = take(resumed, 7)
  resumed.close()
  assert all(_same(x, y) for x, y in zip(head + tail, expected))
  assert resumed.batches == straight.batches


def _text_shards(tmp_path, n):
  return helpers.write_shards(str(tmp_path / "docs"),
                              [{"text": f"document number {i}", "id": str(i)} for i in range(n)])


def test_each_process_reads_its_rows_of_every_global_batch(tmp_path):
  """Two processes, 3 rows each: every global batch is the one-process run's batch, split in
  process order; the processes' parts are disjoint and together every record, every epoch."""
  _text_shards(tmp_path, 30)
  src = sources.open_source(sources.SourceConfig(source="array_record", paths=str(tmp_path)), "d")
  identity = lambda example, rng: example  # noqa: E731
  whole = pipeline.corpus_examples(src, identity, seed=3, process_index=0, process_count=1)
  order = [whole[i]["text"] for i in range(60)]  # two epochs of the global order
  assert len(set(order[:30])) == 30 and sorted(order[30:]) == sorted(order[:30])
  assert order[30:] != order[:30]  # reshuffled every epoch
  parts = [pipeline.corpus_examples(src, identity, seed=3, process_index=p, process_count=2,
                                    rows=3) for p in range(2)]
  mine = [[part[i]["text"] for i in range(30)] for part in parts]
  for batch in range(10):  # global batches of 6: 3 rows of process 0, then 3 of process 1
    assert (mine[0][batch * 3:batch * 3 + 3] + mine[1][batch * 3:batch * 3 + 3]
            == order[batch * 6:batch * 6 + 6])
  for epoch in range(2):
    first, second = (set(m[epoch * 15:epoch * 15 + 15]) for m in mine)
    assert not first & second
    assert first | second == {f"document number {i}" for i in range(30)}
  finite = [pipeline.ProcessRows(grain.MapDataset.range(14), p, 2, 3) for p in range(2)]
  assert [list(f) for f in finite] == [[0, 1, 2, 6, 7, 8, 12, 13], [3, 4, 5, 9, 10, 11]]


def test_a_data_state_carries_over_to_another_process_count(tmp_path):
  """Two processes' states after 3 global batches of 8 become the states of one and of four
  processes that go on exactly where the two-process job was; skip counts go to process 0."""
  _text_shards(tmp_path, 64)
  config = tiny_config()
  config.global_batch = 8
  config.data.corpora = {"docs": dict(kind="text", weight=1.0, source="array_record",
                                      paths=str(tmp_path))}
  one = experiment.make_pipeline(config, 0, 1)
  expected = [next(one)[1]["input_ids_masked"] for _ in range(5)]
  one.close()
  two = [experiment.make_pipeline(config, p, 2) for p in range(2)]
  for _ in range(3):
    for host in two:
      next(host)
  states = [json.loads(pipeline.state_to_json(h.get_state())) for h in two]
  for h in two:
    h.close()
  for count in (1, 4):
    hosts = [experiment.make_pipeline(config, p, count) for p in range(count)]
    for p, host in enumerate(hosts):
      host.set_state(pipeline.carry_over_state(states, p, count, 8 // count))
    assert hosts[0].batches == {"docs": 3 * 2}  # the job's count: 3 batches on 2 processes
    assert count == 1 or not hosts[-1].batches
    for step in range(3, 5):
      rows = np.concatenate([next(h)[1]["input_ids_masked"] for h in hosts])
      np.testing.assert_array_equal(rows, expected[step])
    for host in hosts:
      host.close()
  # Another global batch on one process: on from exactly the same example.
  assert pipeline.carry_over_state(states, 0, 1, 5)["grain"]["corpora"] == {"docs": {
      "next_index": 24}}


def test_two_processes_build_global_batches(tmp_path):
  _text_shards(tmp_path, 64)
  config = tiny_config()
  config.data.corpora = {"docs": dict(kind="text", weight=1.0, source="array_record",
                                      paths=str(tmp_path))}
  hosts = [experiment.make_pipeline(config, p, 2) for p in range(2)]
  local = [next(h)[1] for h in hosts]
  assert local[0]["input_ids_masked"].shape[0] == config.global_batch // 2
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices())
  # One process here: its rows are the whole global batch.
  whole = {k: np.concatenate([local[0][k], local[1][k]]) for k in local[0]}
  arrays = pipeline.to_global(whole, mesh)
  assert arrays["input_ids_masked"].shape == (config.global_batch, config.text_length)
  assert arrays["input_ids_masked"].sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_array_equal(np.asarray(arrays["mlm_labels"]), whole["mlm_labels"])
  with pytest.raises(ValueError, match="global_batch=32 is not divisible by the 3 processes"):
    experiment.make_pipeline(config, 0, 3)


def _png16(size):
  out = io.BytesIO()
  Image.fromarray(np.full(size, 30000, np.uint16)).save(out, "PNG")
  return out.getvalue()


def test_bad_examples_are_counted_by_reason_and_good_ones_all_arrive(tmp_path):
  good = [{"image": helpers.jpeg((i * 20, 90, 40)), "caption": f"good caption {i}"}
          for i in range(12)]
  good[1]["image"] = _png16((20, 20))  # converted, not skipped: 16-bit grayscale
  good[2]["caption"] = "caf\xe9 au lait".encode("latin-1") + b" mostly ascii text"  # one bad byte
  rgba = io.BytesIO()
  Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(rgba, "PNG")
  good[3]["image"] = rgba.getvalue()
  jpeg = helpers.jpeg(size=(64, 64))
  big = helpers.jpeg(size=(300, 300))
  bad = {
      "empty_image": {"image": b"", "caption": "zero bytes"},
      "truncated_image": {"image": jpeg[: len(jpeg) // 2], "caption": "cut short"},
      "undecodable": {"image": b"GIF89a not really an image", "caption": "garbage"},
      "too_large": {"image": big, "caption": "too many pixels"},
      "missing_image": {"caption": "no image at all"},
      "empty_text": {"image": jpeg, "caption": "   \n "},
      "non_utf8_text": {"image": jpeg, "caption": bytes(range(128, 200))},
      "text_too_long": {"image": jpeg, "caption": "word " * 2000},
      "missing_text": {"image": jpeg},
      "corrupt_record": b"\xc1\xc1\xc1 not msgpack",
  }
  helpers.write_shards(str(tmp_path / "mixed"), good + list(bad.values()), num_shards=3)
  config = tiny_config(max_pixels=200 * 200, max_text_bytes=4000)
  config.global_batch = 4
  config.data.corpora = {"web": dict(kind="paired", weight=1.0, source="array_record",
                                     paths=str(tmp_path))}
  it = experiment.make_pipeline(config, 0, 1)
  tok = pipeline.load_tokenizer(pipeline.data_config(config.data)[0])
  first_epoch = take(it, 3)
  captions = [tok.decode(ids) for _, b in first_epoch for ids in b["input_ids"]]
  assert len(captions) == 12 and len(set(captions)) == 12  # every good example, once
  assert sum("good caption" in c for c in captions) == 11
  assert any("au lait mostly ascii" in c for c in captions)  # the bad byte replaced, kept
  take(it, 3)  # a second epoch: every bad record has now been met at least once
  counts = {k.split("/")[1]: v for k, v in it.skipped.items()}
  assert all(k.startswith("web/") for k in it.skipped)
  assert set(counts) == set(bad)
  assert all(1 <= v <= 2 for v in counts.values()), counts


def test_a_corpus_with_nothing_good_stops_with_a_clear_error(tmp_path):
  helpers.write_shards(str(tmp_path / "bad"), [{"image": b"", "caption": "x"}] * 5)
  config = tiny_config(max_consecutive_skips=50)
  config.data.corpora = {"junk": dict(kind="paired", weight=1.0, source="array_record",
                                      paths=str(tmp_path))}
  with pytest.raises(mixture.TooManySkips, match=r"corpus 'junk'.*empty_image"):
    next(experiment.make_pipeline(config, 0, 1))


@pytest.mark.parametrize("field, value, message", [
    ("corpora.paired.colour", "red", r"unknown field\(s\) data\.corpora\.paired\.colour"),
    ("corpora.paired.kind", "video", r"data\.corpora\.paired\.kind='video' is not one of"),
    ("corpora.paired.weight", 0.0, r"data\.corpora\.paired\.weight=0\.0 must be positive"),
    ("corpora.text.source", "s3", r"data\.corpora\.text\.source='s3'"),
    ("worker_count", "four", r"field 'worker_count'"),
    ("corpora.image.name", "photos", r"data\.corpora\.image\.name='photos'"),
    ("corpora.text.fields.text", "body", r"data\.corpora\.text\.fields\.text='body'"),
])
def test_bad_configs_fail_at_start_up_naming_the_field(field, value, message):
  config = tiny_config()
  node = config.data
  *path, last = field.split(".")
  for key in path:
    node = node[key]
  with pytest.raises((ValueError, TypeError), match=message):
    node[last] = value  # ml_collections itself refuses a wrong type
    experiment.make_pipeline(config, 0, 1)


def test_vocabulary_larger_than_the_model_is_refused():
  config = tiny_config()
  config.model.text.vocab_size = 512
  with pytest.raises(ValueError, match="model.text.vocab_size is 512"):
    experiment.make_pipeline(config, 0, 1)


def test_eval_processing_keeps_labels_and_whole_images():
  config = tiny_config()
  cfg, _ = pipeline.data_config(config.data)
  shapes = experiment.parse(config)[1].data_shapes()
  proc = pipeline.make_processor("image", cfg, shapes, None, train=False)
  image = Image.new("RGB", (40, 20), (255, 0, 0))
  image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue: no crop keeps both halves
  data = io.BytesIO()
  image.save(data, "PNG")
  out = proc({"image": data.getvalue(), "label": 7}, None)
  assert out["label"] == 7 and not out["patch_mask"].any()
  dvae = out["dvae_pixels"]
  assert dvae[:, :4, 0].mean() > 240 and dvae[:, -4:, 2].mean() > 240
  assert preprocess.pick_one(np.array([b"a", b"b"], object), None) == b"a"


def test_pipeline_batches_feed_the_sharded_loss(embedded_batches):
  """Batches of each kind, made global over 8 devices, give finite losses (uint8 views are
  finished inside the step: test_transforms checks that arithmetic)."""
  import flava_jax  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from flava_jax.models.flava import abstract_params  # pylint: disable=import-outside-toplevel
  from flava_jax.tasks import StepContext  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  task = experiment.parse(config)[1]
  model, dvae = task.model, task.dvae
  # Random weights from the parameter shapes with numpy (XLA's CPU compile of the threefry
  # initialisers takes longer than this whole test).
  rng = np.random.default_rng(0)
  draw = lambda tree: jax.tree.map(  # noqa: E731
      lambda s: (rng.normal(size=s.shape) * 0.05).astype(s.dtype), tree)
  params = draw(nn.meta.unbox(abstract_params(model)))
  dvae_params = draw(jax.eval_shape(
      lambda: flava_jax.init_dvae_params(dvae, jax.random.key(1), image_size=32)))
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices())
  local = config.global_batch // sharding.data_parallel_size(mesh)
  first = {}
  for corpus, batch in embedded_batches:
    first.setdefault(corpus, batch)
  with jax.set_mesh(mesh):
    for kind, batch in first.items():
      ctx = StepContext(mesh=mesh, local_batch=local)
      loss_fn = jax.jit(lambda p, f, b, r, kind=kind: task.loss(kind, p, {}, f, b, r, ctx))
      out = loss_fn(params, dvae_params, pipeline.to_global(batch, mesh), jax.random.key(2))
      loss, metrics = out.loss, out.metrics
      assert np.isfinite(float(loss)) and float(loss) > 1.0, (kind, metrics)


def test_iterator_state_goes_into_an_orbax_checkpoint_with_the_model(tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  expected = take(experiment.make_pipeline(config, 0, 1), 7)
  it = experiment.make_pipeline(config, 0, 1)
  take(it, 4)
  params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  it.close()
  fresh = experiment.make_pipeline(config, 0, 1)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    restored = manager.restore(4, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  assert all(_same(x, y) for x, y in zip(take(fresh, 3), expected[4:]))
  assert sum(fresh.batches.values()) == 7  # the counters came back with the state


@pytest.mark.parametrize("variant", ["tiny", "full"])
def test_the_configs_data_sections_are_valid(variant):
  config = flava.get_config(variant)
  cfg, corpora = pipeline.data_config(config.data)
  assert {c.kind for c in corpora.values()} == {"paired", "image", "text"}
  weights = {name: c.weight for name, c in corpora.items()}
  assert weights == {"paired": 0.7, "image": 0.15, "text": 0.15}
  shapes = experiment.parse(config)[1].data_shapes()
  block = pipeline.make_processor("image", cfg, shapes, None).block_mask
  assert block.grid_size ** 2 == (config.model.image.image_size // 16) ** 2
  if variant == "full":
    assert (block.num_masked, block.min_block, shapes.dvae_size) == (75, 16, 112)


def test_a_mixed_folder_feeds_each_corpus_its_own_kind_with_nothing_skipped(tmp_path):
  """The image corpus used to read the paired and text shards too (skipped/image/missing_image)
  and the text corpus to stop at start-up on the image shards' fields."""
  folder, written = builds.mixed_folder(str(tmp_path), images=8, texts=8)
  config = tiny_config()
  config.global_batch = 4
  config.data.corpora = {kind: dict(kind=kind, weight=1.0, source="array_record", paths=folder)
                         for kind in ("image", "text")}
  it = experiment.make_pipeline(config, 0, 1)
  take(it, 8)
  it.close()
  assert not it.skipped, it.skipped
  assert it.skip_rates() == {k: 0.0 for k in it.batches}
  assert all(it.seen[k] == 4 * n for k, n in it.batches.items())
  assert written["image"] == 8


def test_skip_rates_put_the_skipped_examples_next_to_those_read(tmp_path):
  good = [{"text": f"a perfectly good document {i}"} for i in range(9)]
  bad = [{"text": "   "}, {"id": "no text at all"}, b"\xc1 not msgpack"]
  for name in ("docs", "clean"):
    (tmp_path / name).mkdir()
  helpers.write_shards(str(tmp_path / "docs" / "docs"), good + bad, num_shards=2)
  helpers.write_shards(str(tmp_path / "clean" / "clean"), good, num_shards=1)
  config = tiny_config()
  config.global_batch = 4
  config.data.corpora = {
      "docs": dict(kind="text", weight=1.0, source="array_record", paths=str(tmp_path / "docs")),
      "clean": dict(kind="text", weight=1.0, source="array_record",
                    paths=str(tmp_path / "clean"))}
  it = experiment.make_pipeline(config, 0, 1)
  take(it, 12)
  skipped_docs = sum(v for k, v in it.skipped.items() if k.startswith("docs/"))
  assert skipped_docs > 0 and set(it.batches) == {"docs", "clean"}
  assert it.seen["docs"] == 4 * it.batches["docs"] + skipped_docs
  assert it.seen["clean"] == 4 * it.batches["clean"]
  rates = it.skip_rates()
  assert rates == {"clean": 0.0, "docs": pytest.approx(skipped_docs / it.seen["docs"])}
  assert 0.0 < rates["docs"] < 0.5  # 3 bad records of 12, give or take where the epoch stopped
  # The counts are part of the state: a resumed iterator carries them on.
  state = json.loads(pipeline.state_to_json(it.get_state()))
  resumed = experiment.make_pipeline(config, 0, 1)
  resumed.set_state(state)
  assert resumed.seen == it.seen and resumed.skip_rates() == rates
  # A state saved before `seen` was kept: rebuilt from the batches and skips on the next batch.
  legacy = experiment.make_pipeline(config, 0, 1)
  legacy.set_state({k: v for k, v in state.items() if k != "seen"})
  next(legacy)
  next(it)
  assert legacy.seen == it.seen and legacy.skip_rates() == it.skip_rates()
  for iterator in (it, resumed, legacy):
    iterator.close()
