"""Each evaluator on the embedded held-out splits, 8 fake devices: a trained tiny FLAVA scores
clearly above chance and a randomly initialised one at chance."""

import numpy as np
import pytest

from flava_jax import evals
from flava_jax.evals import retrieval, zero_shot

from tests.evals.helpers import EVAL_EVERY, TRAIN_STEPS, metrics_lines


def brute_force_recall(similarity, text_image, k):
  """Recall@k by sorting every row and column (no shortcuts), ties broken against the answer."""
  num_images, num_texts = similarity.shape
  t2i = []
  for t in range(num_texts):
    column = similarity[:, t]
    better = [i for i in range(num_images) if column[i] > column[text_image[t]]]
    t2i.append(len(better) < k)
  i2t = []
  for i in range(num_images):
    own = [t for t in range(num_texts) if text_image[t] == i]
    if not own:
      continue
    ranked = sorted(range(num_texts), key=lambda t: -similarity[i, t])
    first = min(ranked.index(t) for t in own)
    # Captions tied with the best own caption do not count against it.
    first = sum(similarity[i, t] > similarity[i, ranked[first]] for t in range(num_texts))
    i2t.append(first < k)
  return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("captions_per_image", [1, 5, 0])
def test_retrieval_metrics_match_a_brute_force_reference(captions_per_image):
  rng = np.random.default_rng(captions_per_image)
  num_images = 40
  if captions_per_image:
    text_image = np.repeat(np.arange(num_images), captions_per_image)
  else:  # uneven: 0 to 4 captions per image, some images with none
    text_image = np.concatenate([[i] * rng.integers(0, 5) for i in range(num_images)]).astype(int)
  similarity = rng.normal(size=(num_images, len(text_image)))
  similarity[text_image, np.arange(len(text_image))] += 1.5  # better than chance
  metrics = retrieval.retrieval_metrics(similarity, text_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i2t, t2i = brute_force_recall(similarity, text_image, k)
    assert metrics[f"i2t_r{k}"] == pytest.approx(i2t)
    assert metrics[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < metrics["i2t_r1"] < metrics["i2t_r5"] <= metrics["i2t_r10"] <= 1


def test_top_k_accuracy():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
  labels = np.array([1, 2, 0])
  assert zero_shot.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert zero_shot.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert zero_shot.top_k_accuracy(logits, labels, 5) == 1.0


def test_map_split_keeps_order_counts_skips_and_pads(ctx):
  """37 examples over 8 devices in batches of 16: outputs in index order, bad ones counted."""
  from flava_jax.data.examples import Skip  # pylint: disable=import-outside-toplevel

  def prepare(i):
    if i % 10 == 3:
      raise Skip("empty_text")
    return {"x": np.full((2,), i, np.float32)}

  out, skipped = ctx.map_split(37, prepare, lambda p, b: {"y": b["x"].sum(-1) * p}, np.float32(2),
                               batch_size=10)
  kept = [i for i in range(37) if i % 10 != 3]
  np.testing.assert_array_equal(out["index"], kept)
  np.testing.assert_allclose(out["y"], 4.0 * np.asarray(kept))
  assert skipped == {"empty_text": 4}
  assert ctx.global_batch(10) == 16


def test_zero_shot_classification(ctx, trained_params, random_params):
  evaluator = evals.build(dict(evaluator="zero_shot"), ctx, "zero_shot")
  trained, random = evaluator(trained_params), evaluator(random_params)
  chance = trained["chance_top1"]
  assert chance == pytest.approx(1 / 32) and trained["images"] == 320
  assert trained["top1"] > 2.5 * chance and trained["top5"] > 2.5 * 5 * chance, trained
  assert random["top1"] < 2 * chance and random["top5"] < 2 * 5 * chance, random


def test_retrieval_with_five_captions_per_image(ctx, trained_params, random_params):
  evaluator = evals.build(dict(evaluator="retrieval", data=dict(
      source="embedded", name="retrieval", split="test",
      fields=dict(image="image", caption="captions"))), ctx, "retrieval")
  trained, random = evaluator(trained_params), evaluator(random_params)
  assert trained["images"] == 200 and trained["texts"] == 1000
  chance = trained["chance_t2i_r1"]
  assert trained["t2i_r1"] > 4 * chance and trained["i2t_r5"] > 0.1, trained
  assert random["t2i_r1"] < 3 * chance and random["i2t_r1"] < 0.04, random


def test_linear_probe(ctx, trained_params, random_params):
  cfg = dict(evaluator="linear_probe", l2_strengths=(1e-2, 1.0, 1e2), train_limit=1200)
  evaluator = evals.build(cfg, ctx, "linear_probe")
  assert evaluator.cfg.features == "image"
  trained = evaluator(trained_params)
  assert trained["train_examples"] == 960 and trained["test_examples"] == 320
  assert trained["top1"] > trained["majority_class_top1"] + 0.3, trained
  assert trained["chance_top1"] == pytest.approx(1 / 32), trained
  # A random network's features are already informative about colour (a known property of
  # random features), so the at-chance control is the probe on shuffled labels: nothing to learn.
  random = evaluator(random_params)
  assert trained["top1"] > random["top1"], (trained, random)
  shuffled = evals.build(dict(cfg, train_data=dict(source="embedded", name="image", split="train",
                                                   fields=dict(image="image", label="label"))),
                         ctx, "linear_probe")
  shuffled.train = _ShuffledLabels(shuffled.train)
  control = shuffled(trained_params)
  assert control["top1"] < 2.5 / 32, control


class _ShuffledLabels:
  """A source whose labels are permuted across examples."""

  def __init__(self, source):
    self.source = source
    self.labels = np.random.default_rng(0).permutation(
        [source[i]["label"] for i in range(len(source))])

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return dict(self.source[index], label=int(self.labels[index]))


# (steps, figure, margin over the best constant answer). Measured with the fixture's model
# (2026-11-23): sentence pairs 0.667 (untrained head 0.477, majority 0.532), VQA 0.353 (0.060,
# best single answer 0.163), visual entailment 0.697 (0.303, majority 0.350; its "neutral" class
# is told by the hypothesis alone, so it learns fastest).
FINETUNE = {"text_pairs": (300, "accuracy", 0.05), "vqa": (200, "vqa_accuracy", 0.1),
            "ve": (100, "accuracy", 0.2)}


@pytest.mark.parametrize("task", sorted(FINETUNE))
def test_finetune(ctx, trained_params, task):
  """Fine-tuned from the trained model: clearly above the best constant answer; the untrained head
  (steps=0): at most about that."""
  from configs.eval import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  steps, metric, margin = FINETUNE[task]
  cfg = finetune_config.get_config(task).task.to_dict()
  cfg.update(steps=steps, log_every_steps=0)
  evaluator = evals.build(cfg, ctx, task)
  tuned = evaluator(trained_params)
  assert tuned["train_loss_end"] < tuned["train_loss_start"], tuned
  assert tuned[metric] > tuned["constant_baseline"] + margin, tuned
  untrained = evals.build(dict(cfg, steps=0), ctx, task)(trained_params)
  assert untrained[metric] < untrained["constant_baseline"] + 0.1, untrained
  assert untrained["test_examples"] == tuned["test_examples"] > 0


def test_finetune_state_is_sharded_and_leaves_the_callers_parameters(ctx, trained_params):
  from configs.eval import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  evaluator = evals.build(dict(finetune_config.get_config("ve").task.to_dict(), steps=2,
                               train_batch_size=16, test_limit=16), ctx, "ve")
  params = ctx.place(trained_params)
  state, _ = evaluator.initial_state(params)
  kernel = state.params["head"]["transform"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert set(state.params["backbone"]) == {"image_encoder", "text_encoder", "multimodal_encoder",
                                        "logit_scale"}  # no projections, no pretraining heads
  evaluator(params)  # donates its own state only
  np.testing.assert_array_equal(np.asarray(params["text_encoder"]["embeddings"]["word_embed"]),
                                trained_params["text_encoder"]["embeddings"]["word_embed"])


def test_the_trainer_runs_evals_every_n_steps_and_at_the_end(trained_workdir):
  lines = [l for l in metrics_lines(trained_workdir) if "eval/zero_shot/top1" in l]
  assert [l["step"] for l in lines] == [EVAL_EVERY, TRAIN_STEPS]
  assert lines[-1]["eval/zero_shot/top1"] > 2.5 / 32


def test_bad_evaluator_configs_name_the_field(ctx):
  with pytest.raises(ValueError, match="evals.x.evaluator"):
    evals.build(dict(evaluator="zero_shoot"), ctx, "evals.x")
  with pytest.raises(ValueError, match="evals.x.temperature"):
    evals.build(dict(evaluator="zero_shot", temperature=1.0), ctx, "evals.x")
  with pytest.raises(ValueError, match="evals.x.data.split='validation'"):
    evals.build(dict(evaluator="zero_shot", data=dict(source="embedded", name="image",
                                                      split="validation")), ctx, "evals.x")
  with pytest.raises(ValueError, match="evals.x.data.fields.label"):
    evals.build(dict(evaluator="zero_shot", data=dict(source="embedded", name="image",
                                                      split="test", fields=dict(image="image",
                                                                                label="class"))),
                ctx, "evals.x")
  with pytest.raises(ValueError, match="evals.x.num_classes"):
    evals.build(dict(evaluator="finetune", inputs="text", num_classes=0), ctx, "evals.x")
