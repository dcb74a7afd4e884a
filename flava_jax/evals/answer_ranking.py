"""VQA the BLIP way: an answer decoder fine-tuned on the questions, then each test question's answer
chosen by ranking candidate answers (the reference's `rank_answer`), scored by VQA accuracy.

Model (the task's predict().answer_model(): BLIP): the image-grounded encoder reads the question,
an answer decoder of its own (initialised from the pretrained decoder) writes "[DEC] answer
[SEP]" cross-attending to the question's states.

Training (steps > 0): each question's answers with weights count / annotators (the reference's
VQA data), at most `max_answers` per question (the most frequent; the others are counted in the
metrics' answers_truncated); loss = sum over a question's answers of weight x the answer's
summed token cross-entropy (label smoothing 0.1, as the reference's decoder), divided by the
questions in the batch. AdamW, warm-up and cosine decay, sharded like the finetune evaluator.

Ranking: the candidates (`answer_list`) are scored by the decoder's probability of their first
token; the top k (k_test, 128 in the reference) are scored by their whole answer's summed token
log-probability (with `score_smoothing`: the label-smoothed loss the reference ranks by; 0 =
plain log-likelihood), and the best one is the answer. k = every candidate ranks them all.

Metrics: vqa_accuracy (min(votes / 3, 1) of the chosen answer), constant_baseline (the best
single answer's), test_examples.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import multihost, train
from flava_jax.data import embedded
from flava_jax.data.examples import Skip
from flava_jax.evals import finetune
from flava_jax.evals.features import EvalContext, TaskConfig, load_names, open_split

IGNORE = -1


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "answer_ranking"
  train_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="vqa", split="train",
      fields=dict(image="image", text="question", answers="answers")))
  test_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="vqa", split="test",
      fields=dict(image="image", text="question", answers="answers")))
  answer_list: str = "embedded"  # the candidates: "embedded", "tfds" or a file (JSON list)
  k_test: int = 128  # candidates re-scored whole per question (-1: all)
  score_smoothing: float = 0.1  # the reference ranks by its label-smoothed loss; 0: likelihood
  label_smoothing: float = 0.1
  answer_length: int = 8  # tokens of "[DEC] answer [SEP]"
  max_answers: int = 10  # distinct answers per question (VQAv2 has 10 annotators)
  steps: int = 300
  train_batch_size: int = 32  # questions per step (global)
  learning_rate: float = 1e-4
  warmup_steps: int = 30
  weight_decay: float = 0.05
  seed: int = 0
  log_every_steps: int = 0
  test_limit: int = 0


def answer_weights(answers: Any, max_answers: int) -> tuple[list[str], list[float], int]:
  """Annotators' answers -> (distinct answers, weight count / annotators, how many distinct
  answers were left out): the most frequent first, ties in first-seen order."""
  if isinstance(answers, np.ndarray):
    answers = answers.tolist()
  if isinstance(answers, (str, bytes)):
    answers = [answers]
  texts = []
  for a in answers or ():
    a = a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a)
    a = " ".join(a.lower().split())
    if a:
      texts.append(a)
  if not texts:
    raise Skip("missing_answers", "no answer")
  counts = collections.Counter(texts)
  order = sorted(counts, key=lambda a: (-counts[a], texts.index(a)))
  kept = order[:max_answers]
  return kept, [counts[a] / len(texts) for a in kept], len(order) - len(kept)


def sequence_scores(logits: jax.Array, ids: jax.Array, mask: jax.Array,
                    smoothing: float) -> jax.Array:
  """Per row, minus the summed token cross-entropy of ids[1:] under logits[:-1] (label smoothing
  `smoothing` as PyTorch applies it), over the positions `mask` keeps: [N]. smoothing 0 gives the
  answer's log-likelihood."""
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  valid = mask[:, 1:].astype(bool)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  per_token = (1 - smoothing) * nll - smoothing * jnp.mean(log_probs, axis=-1)
  return -jnp.sum(jnp.where(valid, per_token, 0.0), axis=-1)


class Evaluator(finetune.Evaluator):
  """Fine-tunes BLIP's answer decoder on a VQA split, then ranks candidate answers."""

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):  # pylint: disable=super-init-not-called
    if not hasattr(ctx.predict, "answer_model"):
      raise ValueError(f"{where}.evaluator='answer_ranking' needs a model with an answer "
                       "decoder (BLIP)")
    if ctx.tokenizer is None:
      raise ValueError(f"{where}: VQA needs the model's tokenizer")
    for name in ("train_batch_size", "answer_length", "max_answers"):
      if getattr(cfg, name) < 1:
        raise ValueError(f"{where}.{name}={getattr(cfg, name)} must be positive")
    if cfg.steps < 0 or cfg.k_test == 0 or cfg.k_test < -1:
      raise ValueError(f"{where}: steps must be >= 0 and k_test positive or -1")
    if cfg.answer_length < 3:
      raise ValueError(f"{where}.answer_length={cfg.answer_length}: [DEC], a token and [SEP]")
    from flava_jax import sharding  # pylint: disable=import-outside-toplevel
    if cfg.train_batch_size % sharding.data_parallel_size(ctx.mesh):
      raise ValueError(f"{where}.train_batch_size={cfg.train_batch_size} is not divisible by "
                       f"the data-parallel size {sharding.data_parallel_size(ctx.mesh)}")
    self.cfg, self.ctx, self.where = cfg, ctx, where
    self.model = ctx.predict.answer_model()
    self.model.check(where)
    needed = ("image", "text", "answers")
    self.train_source = open_split(cfg.train_data, needed, f"{where}.train_data", ctx.cache_dir)
    self.test_source = open_split(cfg.test_data, needed, f"{where}.test_data", ctx.cache_dir)
    names = load_names(cfg.answer_list, embedded.vqa_answers, dict(cfg.test_data), "answers",
                       f"{where}.answer_list")
    self.candidates = [" ".join(n.lower().split()) for n in names]
    self.answers = {a: i for i, a in enumerate(self.candidates)}  # soft scores' vocabulary
    ids = np.stack([self._answer_ids(a)[0] for a in self.candidates])
    self.candidate_ids = ids
    self.candidate_mask = (ids != self.model.pad_id).astype(np.int32)
    self.tx = train.make_optimizer(train.OptimizerConfig(
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay), max(cfg.steps, 1), ctx.predict.decays,
        (finetune.BACKBONE, "answer_decoder"))
    self._test_outputs = lambda params, batch: dict(self.rank(params, batch),
                                                    target=batch["target"])
    self._truncated = collections.Counter()  # distinct answers left out, this process

  # --- data ----------------------------------------------------------------------------------

  def _answer_ids(self, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """"[DEC] answer [SEP]" ids and mask, padded to answer_length."""
    ids, mask, _ = self.ctx.tokenizer.encode(answer, self.cfg.answer_length)
    ids = ids.copy()
    ids[0] = self.model.bos_id
    return ids.astype(np.int32), mask.astype(np.int32)

  def _row(self, example: dict) -> dict[str, np.ndarray]:
    ctx, cfg = self.ctx, self.cfg
    row = dict(ctx.image_row(example.get("image")))
    text = ctx.text_row(example.get("text"), cfg.text_length or ctx.text_length)
    row.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    answers, weights, dropped = answer_weights(example.get("answers"), cfg.max_answers)
    if dropped:
      self._truncated["answers"] += dropped
    ids = np.full((cfg.max_answers, cfg.answer_length), self.model.pad_id, np.int32)
    masks = np.zeros_like(ids)
    for j, answer in enumerate(answers):
      ids[j], masks[j] = self._answer_ids(answer)
    row.update(answer_ids=ids, answer_mask=masks,
               answer_weight=np.asarray(weights + [0.0] * (cfg.max_answers - len(weights)),
                                        np.float32),
               target=finetune.soft_scores(example.get("answers"), self.answers))
    return row

  def _dummy_batch(self) -> dict[str, jax.Array]:
    return {}

  # --- training ------------------------------------------------------------------------------

  def initial_state(self, model_params: Any) -> tuple[train.TrainState, Any]:
    """The sharded state: the backbone from `model_params`, the answer decoder from its decoder."""
    pretrained = dict(model_params)
    state, shardings = super().initial_state(pretrained)
    decoder = self.model.from_pretrained(pretrained)
    wanted = state.params["answer_decoder"]
    jax.tree.map(finetune._check_shape, decoder, wanted)  # pylint: disable=protected-access
    target = jax.tree.map(lambda x: x.sharding, wanted)
    decoder = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=target)(
        multihost.put_same(jax.tree.map(np.asarray, jax.device_get(decoder)), target))
    return state.replace(params=dict(state.params, answer_decoder=decoder)), shardings

  def _loss(self, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    states = self.model.encode(params, batch)  # [B, T, D]
    rows, answers = batch["answer_ids"].shape[:2]
    repeat = lambda x: jnp.repeat(x, answers, axis=0)  # noqa: E731  question b's A answers
    ids = batch["answer_ids"].reshape(rows * answers, -1)
    mask = batch["answer_mask"].reshape(rows * answers, -1)
    logits = self.model.answer_logits(params, ids, mask, repeat(states),
                                      repeat(batch["attention_mask"]))
    per_answer = -sequence_scores(logits, ids, mask, cfg.label_smoothing)
    weights = batch["answer_weight"].reshape(-1)
    loss = jnp.sum(weights * per_answer) / rows
    # The score the finetune loop logs: the share of questions whose top answer is the
    # decoder's best-scored one among their own answers (a training-set sanity figure).
    best = jnp.argmax(jnp.where(weights.reshape(rows, answers) > 0,
                                -per_answer.reshape(rows, answers), -jnp.inf), axis=-1)
    agree = (best == jnp.argmax(batch["answer_weight"], axis=-1)).astype(jnp.float32)
    return loss, agree.mean()

  # --- ranking -------------------------------------------------------------------------------

  def rank(self, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{"choice": the chosen candidate [B], "scores": the top k's whole-answer scores [B, k],
    "top": their candidate indices [B, k]} (inside jit)."""
    cfg = self.cfg
    states = self.model.encode(params, batch)
    rows = states.shape[0]
    qmask = batch["attention_mask"]
    cand_ids = jnp.asarray(self.candidate_ids)
    cand_mask = jnp.asarray(self.candidate_mask)
    count = cand_ids.shape[0]
    k = count if cfg.k_test < 0 else min(cfg.k_test, count)
    start = jnp.full((rows, 1), self.model.bos_id, jnp.int32)
    first = self.model.answer_logits(params, start, jnp.ones_like(start), states, qmask)[:, 0]
    first_prob = jax.nn.softmax(first.astype(jnp.float32), axis=-1)[:, cand_ids[:, 1]]  # [B, C]
    _, top = jax.lax.top_k(first_prob, k)  # [B, k]
    ids = cand_ids[top].reshape(rows * k, -1)
    mask = cand_mask[top].reshape(rows * k, -1)
    logits = self.model.answer_logits(params, ids, mask, jnp.repeat(states, k, axis=0),
                                      jnp.repeat(qmask, k, axis=0))
    scores = sequence_scores(logits, ids, mask, cfg.score_smoothing).reshape(rows, k)
    choice = jnp.take_along_axis(top, jnp.argmax(scores, axis=-1)[:, None], axis=1)[:, 0]
    return {"choice": choice, "scores": scores, "top": top}

  def score(self, params: Any, skipped: collections.Counter | None = None) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    skipped = collections.Counter() if skipped is None else skipped
    count = len(self.test_source) if not cfg.test_limit else min(cfg.test_limit,
                                                                 len(self.test_source))
    out, test_skips = ctx.map_split(count, lambda i: self._row(self.test_source[i]),
                                    self._test_outputs, params, cfg.batch_size, cfg.read_threads)
    skipped.update(test_skips)
    target, choice = out["target"], out["choice"]
    metrics = {"test_examples": float(len(choice)),
               "vqa_accuracy": float(target[np.arange(len(choice)), choice].mean()),
               "constant_baseline": float(target.mean(0).max()),
               "candidates": float(len(self.candidates)),
               "k_test": float(min(cfg.k_test, len(self.candidates)) if cfg.k_test > 0
                               else len(self.candidates))}
    metrics["answers_truncated"] = float(multihost.sum_counts(self._truncated).get("answers", 0))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics
