"""BLIP's evaluations on a random tiny BLIP: ITM re-ranked retrieval (k = all is ranking by ITM
alone; a partial k re-orders exactly each query's top k)."""

import jax
import numpy as np
import pytest

from configs import blip as blip_configs
from configs.eval import retrieval as retrieval_configs
from flava_jax import evals, evaluate, sharding
from flava_jax.evals import retrieval
from flava_jax.tasks.blip import BlipTask

IMAGES = 10  # the embedded five-caption split's first 10 scenes: 50 captions


@pytest.fixture(scope="module")
def blip():
  """(context, parameters) of a random tiny BLIP (one layer per stack, 32 px)."""
  config = blip_configs.get_config("tiny")
  model = config.model
  for part in (model.image, model.text):
    part.update(num_layers=1, hidden_size=32, mlp_dim=64)
  model.image.image_size = 32
  model.embed_dim = 16
  task = BlipTask(config.to_dict())
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rules = sharding.rules_from_config(config.sharding.rules)
  ctx = evaluate.make_context(task, mesh, rules, "", text_length=16)
  params = jax.device_get(task.init_params(jax.random.key(0)))
  return ctx, params


def _evaluator(ctx, **fields):
  task = retrieval_configs.get_config().task
  task.update(limit=IMAGES, batch_size=16, **fields)
  return evals.build(task, ctx, "task")


def _brute_force(ctx, params, evaluator):
  """Every (image, caption) pair's ITM logits [I, T, 2] and ITC similarity [I, T]."""
  images = [ctx.image_row(evaluator.source[i]["image"])["pixels"] for i in range(IMAGES)]
  texts = [ctx.text_row(t, 16) for t in evaluator.texts]
  batch = {"pixels": np.stack([im for im in images for _ in texts]),
           "input_ids": np.stack([t["input_ids"] for _ in images for t in texts]),
           "attention_mask": np.stack([t["attention_mask"] for _ in images for t in texts])}
  logits = np.asarray(jax.jit(ctx.predict.itm_logits)(params, batch), np.float64)
  image_emb = ctx.predict.image_features(params, {"pixels": np.stack(images)})["embedding"]
  text_emb = ctx.predict.text_features(params, {k: np.stack([t[k] for t in texts]) for k in (
      "input_ids", "attention_mask")})["embedding"]
  similarity = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
  return logits.reshape(IMAGES, len(texts), 2), similarity


def test_rerank_with_every_pair_is_ranking_by_itm_alone(blip):
  ctx, params = blip
  evaluator = _evaluator(ctx, rerank_k=-1)
  metrics = evaluator(params)
  logits, similarity = _brute_force(ctx, params, evaluator)
  match = np.exp(logits[..., 1] - np.logaddexp(logits[..., 0], logits[..., 1]))
  by_itm = retrieval.retrieval_metrics(match, evaluator.text_image, (1, 5, 10))
  by_itc = retrieval.retrieval_metrics(similarity, evaluator.text_image, (1, 5, 10))
  assert metrics["rerank_pairs"] == IMAGES * len(evaluator.texts)
  for key, value in by_itm.items():
    assert metrics[f"rerank_{key}"] == pytest.approx(value, abs=1e-9), key
  for key, value in by_itc.items():  # the contrastive figures are reported alongside
    assert metrics[key] == pytest.approx(value, abs=1e-9), key
  # The reference's score (match logit + similarity) with every pair:
  summed = _evaluator(ctx, rerank_k=-1, rerank_score="itm+itc")(params)
  expected = retrieval.retrieval_metrics(logits[..., 1] + similarity, evaluator.text_image,
                                         (1, 5, 10))
  for key, value in expected.items():
    assert summed[f"rerank_{key}"] == pytest.approx(value, abs=1e-9), key


def test_rerank_top_k_reorders_only_each_querys_top_k(blip):
  ctx, params = blip
  k = 3
  evaluator = _evaluator(ctx, rerank_k=k, ks=(1, 2, 3, 5, 50))
  metrics = evaluator(params)
  logits, similarity = _brute_force(ctx, params, evaluator)
  match = np.exp(logits[..., 1] - np.logaddexp(logits[..., 0], logits[..., 1]))
  text_image = evaluator.text_image
  # image->text: rank of the best own caption among the image's candidates, by hand.
  i2t_ranks = []
  for i in range(IMAGES):
    top = list(np.argsort(-similarity[i], kind="stable")[:k])
    order = sorted(top, key=lambda t: -match[i, t]) + [
        t for t in np.argsort(-similarity[i], kind="stable") if t not in top]
    i2t_ranks.append(min(order.index(t) for t in np.flatnonzero(text_image == i)))
  t2i_ranks = []
  for t in range(len(text_image)):
    top = list(np.argsort(-similarity[:, t], kind="stable")[:k])
    order = sorted(top, key=lambda i: -match[i, t]) + [
        i for i in np.argsort(-similarity[:, t], kind="stable") if i not in top]
    t2i_ranks.append(order.index(text_image[t]))
  for r in (1, 2, 3, 5, 50):
    assert metrics[f"rerank_i2t_r{r}"] == pytest.approx(np.mean(np.asarray(i2t_ranks) < r))
    assert metrics[f"rerank_t2i_r{r}"] == pytest.approx(np.mean(np.asarray(t2i_ranks) < r))
  # Within the top k the re-ranking only re-orders: recall at k is the contrastive one.
  assert metrics["rerank_i2t_r3"] == metrics["i2t_r3"]
  assert metrics["rerank_t2i_r3"] == metrics["t2i_r3"]
  assert metrics["rerank_pairs"] < IMAGES * len(text_image)


def test_rerank_settings_are_checked(blip):
  ctx, _ = blip
  with pytest.raises(ValueError, match=r"task\.rerank_score"):
    _evaluator(ctx, rerank_k=4, rerank_score="itc")
  with pytest.raises(ValueError, match=r"task\.rerank_k=-2"):
    _evaluator(ctx, rerank_k=-2)


# --- VQA: the answer decoder ranking candidates ---------------------------------------------


def _vqa(ctx, **fields):
  task = dict(evaluator="answer_ranking", steps=0, batch_size=8, train_batch_size=8,
              test_limit=6, k_test=-1, score_smoothing=0.0)
  task.update(fields)
  return evals.build(task, ctx, "task")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def vqa_brute_force(blip):
  """(evaluator, its initial parameters, 6 test rows, every candidate's decoder logits [Q, C, L,
  V] computed one question and one candidate at a time)."""
  ctx, params = blip
  evaluator = _vqa(ctx)
  state, _ = evaluator.initial_state(params)
  model = evaluator.model

  @jax.jit
  def logits_of(params, batch, ids, mask):  # one question, one candidate
    states = model.encode(params, batch)
    return model.answer_logits(params, ids, mask, states, batch["attention_mask"])

  rows = [evaluator._row(evaluator.test_source[i]) for i in range(6)]
  logits = np.zeros((6, len(evaluator.candidates), evaluator.candidate_ids.shape[1],
                     model.model.config.text.vocab_size))
  for q, row in enumerate(rows):
    batch = {k: row[k][None] for k in ("pixels", "input_ids", "attention_mask")}
    for c in range(len(evaluator.candidates)):
      logits[q, c] = np.asarray(logits_of(state.params, batch, evaluator.candidate_ids[c][None],
                                          evaluator.candidate_mask[c][None]), np.float64)[0]
  return evaluator, state.params, rows, logits


def _brute_force_scores(evaluator, logits, smoothing):
  """Each candidate's whole-answer score per question from its own logits: [Q, C]."""
  out = np.zeros(logits.shape[:2])
  for q in range(logits.shape[0]):
    for c in range(logits.shape[1]):
      ids, mask = evaluator.candidate_ids[c], evaluator.candidate_mask[c]
      log_probs = _log_softmax(logits[q, c, :-1])
      total = 0.0
      for t in range(1, int(mask.sum())):  # the tokens after [DEC], [SEP] included
        nll = -log_probs[t - 1, ids[t]]
        total += (1 - smoothing) * nll - smoothing * log_probs[t - 1].mean()
      out[q, c] = -total
  return out


def test_answer_weights_are_vote_shares_most_frequent_first():
  answers, weights, dropped = __import__(
      "flava_jax.evals.answer_ranking", fromlist=["x"]).answer_weights(
          ["Red", "blue", "red", " red ", "two", "blue"], 2)
  assert answers == ["red", "blue"] and weights == pytest.approx([0.5, 1 / 3]) and dropped == 1


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ranking_every_candidate_equals_brute_force_scoring(blip, vqa_brute_force, smoothing):
  ctx, params = blip
  first, answer_params, rows, logits = vqa_brute_force
  evaluator = _vqa(ctx, score_smoothing=smoothing)
  batch = {k: np.stack([r[k] for r in rows]) for k in ("pixels", "input_ids", "attention_mask")}
  ranked = jax.jit(evaluator.rank)(answer_params, batch)
  brute = _brute_force_scores(first, logits, smoothing)
  assert np.asarray(ranked["choice"]).tolist() == brute.argmax(1).tolist()
  order = np.asarray(ranked["top"])
  got = np.asarray(ranked["scores"])
  np.testing.assert_allclose(got, np.take_along_axis(brute, order, 1), rtol=1e-5, atol=1e-5)
  # The answer decoder starts as the pretrained decoder, made whole.
  full = evaluator.model.model.expand(params)
  np.testing.assert_array_equal(np.asarray(answer_params["answer_decoder"]["lm_head"]["bias"]),
                                np.asarray(full["lm_head"]["bias"]))


def test_ranking_the_top_k_by_first_token_then_whole_answers(blip, vqa_brute_force):
  ctx, _ = blip
  k = 3
  first, answer_params, rows, logits = vqa_brute_force
  evaluator = _vqa(ctx, k_test=k)
  batch = {key: np.stack([r[key] for r in rows])
           for key in ("pixels", "input_ids", "attention_mask")}
  ranked = jax.jit(evaluator.rank)(answer_params, batch)
  brute = _brute_force_scores(first, logits, 0.0)
  # The decoder's first step reads [DEC] only: every candidate's logits at position 0 are it.
  first_prob = np.exp(_log_softmax(logits[:, 0, 0]))[:, evaluator.candidate_ids[:, 1]]
  for q in range(6):
    top = set(np.argsort(-first_prob[q], kind="stable")[:k].tolist())
    assert set(np.asarray(ranked["top"][q]).tolist()) == top
    assert int(ranked["choice"][q]) == max(top, key=lambda c: brute[q, c])


def test_vqa_fine_tuning_lowers_the_answer_loss(blip):
  ctx, params = blip
  evaluator = _vqa(ctx, steps=24, learning_rate=3e-3, warmup_steps=2, k_test=4,
                   score_smoothing=0.1)
  metrics = evaluator(params)
  assert metrics["train_loss_end"] < 0.85 * metrics["train_loss_start"], metrics
  assert metrics["test_examples"] == 6.0 and metrics["candidates"] == 15.0
  assert 0.0 <= metrics["vqa_accuracy"] <= 1.0 and metrics["answers_truncated"] == 0.0
