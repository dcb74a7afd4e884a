"""The tri-modal processor (preprocess.TrimodalProcessor) on built spoken shards: the arrays the
omni step reads, token-level masks of the configured sizes, modality masking that never masks
all three and masks each at its rate within sampling error, uniform sample-level classes, and
pipeline batches with the task's batch spec."""

import numpy as np
import pytest

from configs import omni as omni_configs
from flava_jax import tasks
from flava_jax.data import embedded, pipeline, preprocess, sources
from flava_jax.data.masking import IGNORE_INDEX

SIZES = {"train": 12, "test": 4}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
  folder = tmp_path_factory.mktemp("spoken")
  embedded.build_spoken(str(folder), SIZES)
  return str(folder / "spoken-train-00000-of-00001.array_record")


def _setup(path, **data):
  config = omni_configs.get_config("tiny")
  config.data.corpora = {"spoken": dict(config.data.corpora["spoken"], source="array_record",
                                        paths=path)}
  config.data.read_threads = 0
  config.data.update(data)
  task = tasks.build(config)
  cfg, corpora = pipeline.data_config(config.data)
  task.check(cfg)
  return task, cfg, corpora


def test_rows_hold_what_the_step_reads_with_masks_of_the_configured_sizes(spoken):
  task, cfg, corpora = _setup(spoken)
  processor = task.processors(cfg, ["trimodal"])["trimodal"]
  source = sources.open_source(corpora["spoken"].source_config(""), "x", "trimodal")
  spec = task.batch_spec("trimodal", 1)
  rng, labelled = np.random.default_rng(0), 0
  for index in range(len(source)):
    row = processor(source[index], rng)
    assert set(row) == set(spec)
    for name, want in spec.items():
      assert row[name].shape == want.shape[1:] and row[name].dtype == want.dtype, name
    assert row["patch_mask"].sum() == round(0.15 * 64)  # 10 of the 8 x 8 patches
    real = task.audio_config.frames(int(row["audio_mask"].sum()))
    assert not row["frame_mask"][real:].any()  # only real frames are masked
    assert row["frame_mask"].sum() == max(1, round(0.15 * real))
    chosen = row["mlm_labels"] != IGNORE_INDEX
    labelled += chosen.sum()  # 15% of each caption's tokens, drawn per token (BERT's rule)
    assert (row["mlm_labels"][chosen] == row["input_ids"][chosen]).all()
    assert (row["input_ids_masked"][~chosen] == row["input_ids"][~chosen]).all()
    assert row["present"].any() and 0 <= row["match_class"] < 5
  assert labelled > 0
  evaluation = task.processors(cfg, ["trimodal"], train=False)["trimodal"](source[0], None)
  assert set(evaluation) == {"pixels", "dvae_pixels", "input_ids", "attention_mask", "audio",
                             "audio_mask"}
  again = task.processors(cfg, ["trimodal"], train=False)["trimodal"](source[0], None)
  for name, value in evaluation.items():
    np.testing.assert_array_equal(value, again[name])


def test_modality_masking_never_masks_all_three_and_masks_each_at_its_rate():
  rng, draws, rate = np.random.default_rng(1), 40_000, 0.3
  present = np.stack([preprocess.modality_presence(rng, rate) for _ in range(draws)])
  assert present.any(1).all()
  # Drawn again when all three are masked: each is masked with (r - r^3) / (1 - r^3) = 0.2806.
  expected = (rate - rate**3) / (1 - rate**3)
  tolerance = 4 * np.sqrt(expected * (1 - expected) / draws)
  masked = 1 - present.mean(0)
  assert np.all(np.abs(masked - expected) < tolerance), masked
  # independent otherwise: two masked together with (r^2 - r^3) / (1 - r^3)
  both = np.mean(~present[:, 0] & ~present[:, 1])
  pair = (rate**2 - rate**3) / (1 - rate**3)
  assert abs(both - pair) < 4 * np.sqrt(pair * (1 - pair) / draws)


def test_sample_level_classes_are_uniform(spoken):
  task, cfg, corpora = _setup(spoken)
  processor = task.processors(cfg, ["trimodal"])["trimodal"]
  example = sources.open_source(corpora["spoken"].source_config(""), "x", "trimodal")[0]
  rng = np.random.default_rng(2)
  classes = np.array([processor(example, rng)["match_class"] for _ in range(1500)])
  counts = np.bincount(classes, minlength=5)
  chi2 = ((counts - 300.0) ** 2 / 300.0).sum()
  assert chi2 < 18.5, counts  # chi-square with 4 degrees of freedom: p = 0.001


def test_pipeline_batches_have_the_task_spec(spoken):
  task, cfg, corpora = _setup(spoken)
  data = pipeline.make_pipeline(cfg, corpora, task.processors(cfg, ["trimodal"]),
                                global_batch=4, seed=0)
  name, batch = next(data)
  assert name == "spoken"
  spec = task.batch_spec("trimodal", 4)
  host = task.host_batch("trimodal", batch)
  assert set(host) == set(spec)
  for key, want in spec.items():
    assert host[key].shape == want.shape and host[key].dtype == want.dtype, key


def test_bad_rates_fail_at_start_up_naming_the_field():
  config = omni_configs.get_config("tiny")
  config.masking.patch_rate = 1.5
  with pytest.raises(ValueError, match="masking.patch_rate=1.5"):
    tasks.build(config)
  config = omni_configs.get_config("tiny")
  config.masking.modality_rate = 1.0
  with pytest.raises(ValueError, match="masking.modality_rate"):
    tasks.build(config)
