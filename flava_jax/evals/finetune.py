"""Fine-tuning: a two-layer classifier head on h_CLS_I, h_CLS_T or h_CLS_M, trained with the
whole model (FLAVA's GLUE, VQAv2, SNLI-VE and Hateful Memes protocol), then scored on a test split.

    inputs=text        one text ("text") or a pair ("text" + "text_pair"): GLUE-style tasks
    inputs=image       the image: classification by fine-tuning
    inputs=image_text  image + "text" (a question, a hypothesis): VQA, SNLI-VE, Hateful Memes
    target=label       an integer class: softmax cross-entropy; accuracy (and AUROC for 2 classes)
    target=answers     VQA: a list of annotators' answers -> soft scores min(votes / 3, 1) over the
                       answer vocabulary, binary cross-entropy; VQA accuracy (score of the argmax)

The state is created sharded on the evaluation mesh (parameters by the model's logical axes,
batches over the data-parallel axes) and the step is jitted with the state donated, as in
pretraining; AdamW with warm-up and cosine decay (train.make_optimizer). steps=0 scores the
untrained head: the at-chance control.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flava_jax import multihost, sharding, train
from flava_jax.data import embedded, pipeline, transforms
from flava_jax.data.examples import Skip
from flava_jax.evals.features import (EvalContext, TaskConfig, load_names, open_split,
                                      row_or_skip)

BACKBONE = "backbone"  # the classifier's parameter group holding the evaluated model's
INPUTS = ("image", "text", "image_text")
_NEEDED = {"image": ("image",), "text": ("text",), "image_text": ("image", "text")}
VQA_SCORE_VOTES = 3.0  # an answer given by this many annotators scores 1


@dataclasses.dataclass(frozen=True)
class Config(TaskConfig):
  evaluator: str = "finetune"
  inputs: str = "text"  # image | text | image_text
  text_pair: bool = False  # inputs=text: the records also have "text_pair" (GLUE sentence pairs)
  target: str = "label"  # label | answers
  num_classes: int = 0  # target=label: number of classes (labels outside are skipped, counted)
  answer_vocab: str = "embedded"  # target=answers: "embedded", "tfds" or a file of answers
  hidden_size: int = 0  # the head's hidden width (0: twice the encoder width, FLAVA's 1536)
  train_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="text_pairs", split="train"))
  test_data: dict = dataclasses.field(default_factory=lambda: dict(
      source="embedded", name="text_pairs", split="test"))
  steps: int = 300
  train_batch_size: int = 32  # global
  learning_rate: float = 1e-4
  warmup_steps: int = 30
  weight_decay: float = 1e-2
  seed: int = 0
  log_every_steps: int = 0  # print the training loss this often (0: never)
  test_limit: int = 0  # test examples used (0: all)


def soft_scores(answers: Any, vocab: dict[str, int]) -> np.ndarray:
  """Annotators' answers -> [len(vocab)] float32 scores min(votes / 3, 1)."""
  if isinstance(answers, np.ndarray):
    answers = answers.tolist()
  if isinstance(answers, (str, bytes)):
    answers = [answers]
  votes = collections.Counter()
  for answer in answers or ():
    answer = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
    answer = " ".join(answer.lower().split())
    if answer in vocab:
      votes[vocab[answer]] += 1
  scores = np.zeros(len(vocab), np.float32)
  for index, count in votes.items():
    scores[index] = min(count / VQA_SCORE_VOTES, 1.0)
  return scores


class Evaluator:

  def __init__(self, cfg: Config, ctx: EvalContext, where: str):
    if cfg.inputs not in INPUTS:
      raise ValueError(f"{where}.inputs={cfg.inputs!r}: use one of {INPUTS}")
    if cfg.target not in ("label", "answers"):
      raise ValueError(f"{where}.target={cfg.target!r}: use label or answers")
    if cfg.steps < 0 or cfg.train_batch_size <= 0:
      raise ValueError(f"{where}.steps must be >= 0 and {where}.train_batch_size positive")
    if cfg.train_batch_size % sharding.data_parallel_size(ctx.mesh):
      raise ValueError(f"{where}.train_batch_size={cfg.train_batch_size} is not divisible by "
                       f"the data-parallel size {sharding.data_parallel_size(ctx.mesh)}")
    self.cfg, self.ctx, self.where = cfg, ctx, where
    needed = _NEEDED[cfg.inputs] + (("text_pair",) if cfg.text_pair else ()) + (cfg.target,)
    self.train_source = open_split(cfg.train_data, needed, f"{where}.train_data", ctx.cache_dir)
    self.test_source = open_split(cfg.test_data, needed, f"{where}.test_data", ctx.cache_dir)
    if cfg.target == "answers":
      names = load_names(cfg.answer_vocab, embedded.vqa_answers, dict(cfg.train_data), "answers",
                         f"{where}.answer_vocab")
      self.answers = {" ".join(n.lower().split()): i for i, n in enumerate(names)}
      self.num_classes = len(names)
    else:
      if cfg.num_classes < 2:
        raise ValueError(f"{where}.num_classes={cfg.num_classes}: give the number of classes")
      self.num_classes = cfg.num_classes
    width = ctx.predict.classifier_width(cfg.inputs)
    self.model = ctx.predict.classifier(cfg.inputs, self.num_classes,
                                        cfg.hidden_size or 2 * width)
    self.tx = train.make_optimizer(train.OptimizerConfig(
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay), max(cfg.steps, 1), ctx.predict.decays,
        (BACKBONE, "head"))
    self._test_outputs = lambda params, batch: {
        "logits": self._apply(params, batch), "target": batch["target"]}

  def _apply(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The classifier's logits; uint8 views finished into normalised pixels on the device."""
    if "pixels" in batch and batch["pixels"].dtype == jnp.uint8:
      batch = dict(batch, pixels=transforms.encoder_pixels(batch["pixels"]))
    return self.model.apply({"params": params}, batch)

  # --- data ----------------------------------------------------------------------------------

  def _row(self, example: dict) -> dict[str, np.ndarray]:
    ctx, cfg = self.ctx, self.cfg
    row = {}
    if cfg.inputs in ("image", "image_text"):
      row.update(ctx.image_row(example.get("image")))
    if cfg.inputs in ("text", "image_text"):
      pair = example.get("text_pair") if cfg.text_pair else None
      if cfg.text_pair and pair is None:
        raise Skip("missing_text", "no text_pair")
      row.update(ctx.text_row(example.get("text"), cfg.text_length or ctx.text_length, pair))
    if cfg.target == "answers":
      row["target"] = soft_scores(example.get("answers"), self.answers)
    else:
      label = example.get("label")
      if label is None or not 0 <= int(label) < self.num_classes:
        raise Skip("corrupt_record", f"label {label!r} outside 0..{self.num_classes - 1}")
      row["target"] = np.int32(label)
    return row

  def _train_batches(self, host_batch: int, skipped: collections.Counter
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Endless host batches of this process's rows of the train split's global batches,
    reshuffled each epoch: one global order, process p reading rows [p*B/P, (p+1)*B/P) of each
    global batch of B, so that the batches are the same for any number of processes."""
    source, cfg = self.train_source, self.cfg
    pcount, pindex = jax.process_count(), jax.process_index()

    safe = row_or_skip(lambda index: self._row(source[int(index)]))
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.read_threads)) as pool:
      for epoch in range(1 << 30):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(source))
        kept_this_epoch = 0
        for start in range(pindex * host_batch, len(order), pcount * host_batch):
          for row in pool.map(safe, order[start:start + host_batch]):
            if isinstance(row, str):
              skipped[row] += 1
            else:
              rows.append(row)
              kept_this_epoch += 1
          while len(rows) >= host_batch:
            batch, rows = rows[:host_batch], rows[host_batch:]
            yield {k: np.stack([r[k] for r in batch]) for k in batch[0]}
        if not kept_this_epoch:
          raise ValueError(f"{self.where}.train_data: no usable example ({dict(skipped)})")

  # --- training ------------------------------------------------------------------------------

  def _loss(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    logits = self._apply(params, batch)
    if self.cfg.target == "answers":  # summed over answers, as VQA heads are trained
      loss = optax.sigmoid_binary_cross_entropy(logits, batch["target"]).sum(-1)
      score = jnp.take_along_axis(batch["target"], jnp.argmax(logits, -1)[:, None], 1)[:, 0]
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
      score = (jnp.argmax(logits, -1) == batch["target"]).astype(jnp.float32)
    return loss.mean(), score.mean()

  def initial_state(self, model_params: Any) -> tuple[train.TrainState, Any]:
    """The sharded train state: head random, the backbone's groups from `model_params`."""
    ctx, cfg = self.ctx, self.cfg
    batch = self._dummy_batch()

    def init(rng):
      return self.model.init(rng, batch)["params"]

    logical = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
    shardings = sharding.logical_to_shardings(logical, ctx.mesh, ctx.rules)
    unboxed = lambda rng: (nn.meta.unbox(init(rng)), {})
    state, state_shardings = train.create_state(unboxed, self.tx, shardings, {}, ctx.mesh,
                                                jax.random.key(cfg.seed, impl="rbg"), ctx.rules)
    wanted = state.params[BACKBONE]
    missing = sorted(set(wanted) - set(model_params))
    if missing:
      raise ValueError(f"{self.where}: the evaluated parameters lack {missing}")
    backbone = {k: model_params[k] for k in wanted}
    jax.tree.map(_check_shape, backbone, wanted)
    # Placed and copied: the step donates the state, and the caller's parameters (a training
    # run's own, already in these shardings) must survive it.
    backbone = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                       out_shardings=shardings[BACKBONE])(
                           jax.device_put(backbone, shardings[BACKBONE]))
    return state.replace(params=dict(state.params, **{BACKBONE: backbone})), state_shardings

  def _dummy_batch(self) -> dict[str, jax.Array]:
    length = self.cfg.text_length or self.ctx.text_length
    size = self.ctx.predict.image_size
    return {"pixels": jnp.zeros((1, size, size, 3), jnp.uint8),
            "input_ids": jnp.zeros((1, length), jnp.int32),
            "attention_mask": jnp.ones((1, length), jnp.int32),
            "token_type_ids": jnp.zeros((1, length), jnp.int32)}

  def make_step(self, state_shardings: Any):
    ctx, tx = self.ctx, self.tx

    def step(state, batch):
      with nn.logical_axis_rules(list(ctx.rules)):
        (loss, score), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch)
      return train.apply_gradients(tx, state, grads, {"loss": loss, "score": score})

    replicated = sharding.replicated(ctx.mesh)
    jitted = jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(ctx.mesh)),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def run(state, batch):
      with jax.set_mesh(ctx.mesh):
        return jitted(state, batch)
    return run

  def __call__(self, params: Any) -> dict[str, float]:
    ctx, cfg = self.ctx, self.cfg
    state, state_shardings = self.initial_state(params)
    skipped: collections.Counter = collections.Counter()
    losses = []
    if cfg.steps:
      step = self.make_step(state_shardings)
      batches = self._train_batches(cfg.train_batch_size // jax.process_count(), skipped)
      for i in range(cfg.steps):
        state, metrics = step(state, pipeline.to_global(next(batches), ctx.mesh))
        losses.append(metrics["loss"])
        if i:  # one step in flight, as in training: not hundreds queued on a busy host
          losses[-2].block_until_ready()
        if cfg.log_every_steps and (i + 1) % cfg.log_every_steps == 0:
          multihost.say(f"{self.where} step {i + 1}/{cfg.steps}: loss "
                        f"{float(metrics['loss']):.4f}")
      batches.close()
      losses = [float(x) for x in jax.device_get(losses)]
      skipped = collections.Counter(multihost.sum_counts(skipped))  # the job's
    out = self.score(state.params, skipped)
    if losses:
      window = max(1, min(10, len(losses) // 4))
      out.update(train_loss_start=float(np.mean(losses[:window])),
                 train_loss_end=float(np.mean(losses[-window:])))
    out["steps"] = float(cfg.steps)
    return out

  def score(self, params: Any, skipped: collections.Counter | None = None) -> dict[str, float]:
    """Accuracy (VQA accuracy for answers) of the classifier on the test split."""
    ctx, cfg = self.ctx, self.cfg
    skipped = collections.Counter() if skipped is None else skipped
    count = len(self.test_source) if not cfg.test_limit else min(cfg.test_limit,
                                                                 len(self.test_source))
    out, test_skips = ctx.map_split(
        count, lambda i: self._row(self.test_source[i]),
        self._test_outputs, params, cfg.batch_size, cfg.read_threads)
    skipped.update(test_skips)
    logits, target = out["logits"], out["target"]
    predicted = logits.argmax(-1)
    metrics = {"test_examples": float(len(predicted))}
    if cfg.target == "answers":
      metrics["vqa_accuracy"] = float(target[np.arange(len(predicted)), predicted].mean())
      metrics["constant_baseline"] = float(target.mean(0).max())  # best single answer
    else:
      metrics["accuracy"] = float((predicted == target).mean())
      metrics["constant_baseline"] = float(np.bincount(target, minlength=self.num_classes).max()
                                           / max(len(target), 1))
      if self.num_classes == 2 and len(set(target.tolist())) == 2:
        from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel
        margin = logits[:, 1] - logits[:, 0]
        metrics["auroc"] = float(roc_auc_score(target, margin))
    metrics.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
    return metrics


def _check_shape(value: Any, target: Any) -> None:
  if tuple(np.shape(value)) != tuple(target.shape):
    raise ValueError(f"a pretrained parameter has shape {np.shape(value)}, the classifier's "
                     f"{target.shape}: the configs differ")
