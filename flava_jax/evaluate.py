"""Evaluation of a trained or converted model: the binary and what training runs call.

    python -m flava_jax.evaluate --config=configs/eval/zero_shot.py --checkpoint=DIR

DIR is a training workdir (its newest checkpoint and run_config.json), a model directory from
`python -m flava_jax.convert`, or a transformers save_pretrained directory (converted on the fly).
The config names one evaluator and its splits (`config.task`, see flava_jax/evals/); the same
task mappings go under `config.evals` of a training config to run during training. Evaluators
call the predict functions of the model's task (tasks/), rebuilt from the workdir's run config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from flava_jax import evals, experiment, sharding, tasks, warm_start
from flava_jax.data import embedded, sources
from flava_jax.data.tokenizer import Tokenizer
from flava_jax.evals.features import EvalContext

EVAL_FIELDS = ("task", "vocab_file", "cache_dir", "text_length", "sharding")


@dataclasses.dataclass
class Checkpoint:
  """A model to evaluate: its task, parameters (host arrays) and how it reads text."""

  task: tasks.Task
  params: Any
  vocab_file: str  # "" = the embedded corpus's vocabulary
  text_length: int
  kind: str  # workdir | model | transformers
  # The task's frozen inputs as the run made them (a workdir's seed and init sources), or None.
  load_frozen: Callable[[], Any] | None = None

  @property
  def predict(self) -> Any:
    return self.task.predict()


def load_checkpoint(path: str, field: str = "--checkpoint") -> Checkpoint:
  kind = warm_start.source_kind(path, field)
  if kind == "workdir":
    run_config = os.path.join(path, warm_start.RUN_CONFIG)
    if not os.path.exists(run_config):
      raise FileNotFoundError(f"{field}={path!r}: the workdir has no {warm_start.RUN_CONFIG}")
    with open(run_config, encoding="utf-8") as f:
      run = json.load(f)
    task = tasks.for_run_config(run, f"{field}={path!r}")
    if task.predict() is None:
      raise ValueError(f"{field}={path!r} is a {task.NAME} training workdir, which has no "
                       "evaluators of this kind")
    def load_frozen():
      kinds = tuple(c.get("kind", "") for c in run.get("data", {}).get("corpora", {}).values())
      return task.init_frozen(int(run.get("seed", 0)), run.get("init", {}), kinds)
    return Checkpoint(task, warm_start.read_workdir_params(path, field),
                      run.get("data", {}).get("vocab_file", ""),
                      task.predict().text_length, kind, load_frozen)
  family = "flava"
  if kind == "model":
    from flava_jax import checkpoint  # pylint: disable=import-outside-toplevel
    loaded = checkpoint.load_model(path)
    config, params, family = loaded.model.config, loaded.params, loaded.task
    if family == "audio":
      raise ValueError(f"{field}={path!r} holds an audio encoder alone, which has no "
                       "evaluators; start an audio task from it (init.audio_from) and evaluate "
                       "that task's workdir")
  else:
    from flava_jax import convert  # pylint: disable=import-outside-toplevel
    model, params = convert.from_transformers(path)
    config = model.config
  vocab = os.path.join(path, "vocab.txt")
  task = tasks.for_converted_model(config, family)
  return Checkpoint(task, params, vocab if os.path.exists(vocab) else "",
                    task.predict().text_length, kind)


def make_context(task: tasks.Task, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                 vocab_file: str, cache_dir: str = "", text_length: int = 0,
                 load_frozen: Callable[[], Any] | None = None) -> EvalContext:
  """The evaluation context of a task's model (its predict functions); the vocabulary must fit
  the model's text embedding. text_length: default tokens per text (0: the model's own).
  load_frozen: () -> the task's frozen inputs on the host (placed replicated on first use)."""
  predict = task.predict()
  if predict is None:
    raise ValueError(f"the {task.NAME} task has no evaluators")
  text_length = text_length or predict.text_length
  frozen = None
  if load_frozen is not None:
    frozen = lambda: jax.device_put(load_frozen(), sharding.replicated(mesh))  # noqa: E731
  if not predict.text_vocab_size:  # a model that reads no text (an image tokenizer)
    return EvalContext(predict=predict, mesh=mesh, rules=rules, tokenizer=None,
                       text_length=0, cache_dir=cache_dir, load_frozen=frozen)
  tokenizer = Tokenizer(vocab_file or embedded.vocab_file(cache_dir))
  if tokenizer.vocab_size > predict.text_vocab_size:
    raise ValueError(f"vocab_file has {tokenizer.vocab_size} tokens but the model's text "
                     f"vocabulary has {predict.text_vocab_size}: name the model's vocab.txt")
  if text_length > predict.max_text_length:
    raise ValueError(f"text_length={text_length} exceeds the model's "
                     f"{predict.max_text_length} positions")
  return EvalContext(predict=predict, mesh=mesh, rules=rules, tokenizer=tokenizer,
                     text_length=text_length, cache_dir=cache_dir, load_frozen=frozen)


def check_config(config: Any) -> None:
  """Start-up checks of an evaluation config: field names and the task's fields."""
  unknown = sorted(set(config.keys()) - set(EVAL_FIELDS))
  if unknown:
    raise ValueError(f"unknown field(s) {', '.join('config.' + u for u in unknown)}; an "
                     f"evaluation config has {', '.join(EVAL_FIELDS)}")
  evals.parse(config.task, "task")
  sharding.rules_from_config(config.sharding.rules)


def vocabulary(ckpt: Checkpoint, vocab_file: str, flag: str) -> str:
  """The vocab.txt to read a checkpoint's text with: `vocab_file`, else the checkpoint's own
  (a workdir's config, a model directory's vocab.txt), else the embedded corpus's, which only
  a model of the embedded vocabulary's size may use (errors name `flag`)."""
  vocab_file = vocab_file or ckpt.vocab_file
  size = getattr(ckpt.predict, "tokenizer_vocab_size", ckpt.predict.text_vocab_size)
  if not vocab_file and ckpt.kind != "workdir" and size != embedded.VOCAB_SIZE:
    raise ValueError(f"the checkpoint's text vocabulary has {size} tokens and its directory "
                     f"no vocab.txt: set {flag} to the model's (bert-base-uncased's vocab.txt "
                     "for facebook/flava-full and Salesforce's BLIP)")
  return vocab_file


def run(config: Any, checkpoint_path: str) -> dict[str, float]:
  """Loads the checkpoint, builds the task's evaluator on this process's mesh, runs it."""
  check_config(config)
  ckpt = load_checkpoint(checkpoint_path)
  vocab_file = vocabulary(ckpt, config.vocab_file, "--config.vocab_file")
  mesh = sharding.make_mesh(config.sharding.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  ctx = make_context(ckpt.task, mesh, rules, vocab_file, config.cache_dir,
                     config.text_length or ckpt.text_length, ckpt.load_frozen)
  evaluator = evals.build(config.task, ctx, "task")
  return evaluator(ckpt.params)


def format_figure(value: Any) -> str:
  """A metric as printed: whole numbers as such, accuracies to four decimals, and small or large
  values (an L2 strength of 1e-06, a learning rate) to three significant digits."""
  if isinstance(value, float) and not value.is_integer():
    return f"{value:.4f}" if 0.01 <= abs(value) < 1e4 else f"{value:.3g}"
  return f"{value:g}"


def format_metrics(name: str, metrics: Mapping[str, float]) -> str:
  """One line: the figures first, counts and skips after (format_figure)."""
  return f"{name}: " + ", ".join(f"{k} {format_figure(v)}" for k, v in metrics.items())


def eval_rows(config: Any, kind: str, source_config: sources.SourceConfig | None = None,
              limit: int | None = None) -> list[dict]:
  """Held-out examples of one corpus kind, processed as the training config's task processes
  them in eval mode (whole image, no masks), the bad ones skipped. Default source: the embedded
  test split of that kind."""
  run, task = experiment.parse(config)
  processor = task.processors(run.data, (kind,), train=False)[kind]
  source_config = source_config or sources.SourceConfig(name=kind, split="test",
                                                        cache_dir=run.data.cache_dir)
  source = sources.open_source(source_config, f"eval.{kind}", kind)
  source.check(kind)
  count = len(source) if limit is None else min(limit, len(source))
  rows = [processor(source[i], None) for i in range(count)]
  return [r for r in rows if "_skip" not in r]


def main(argv) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel,g-multiple-import
  from flava_jax import binary  # pylint: disable=import-outside-toplevel
  binary.start(argv)
  config = flags.FLAGS.config
  try:
    metrics = run(config, flags.FLAGS.checkpoint)  # checks the config before loading anything
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise app.UsageError(f"bad config or checkpoint: {e}") from None
  if jax.process_index() == 0:
    print(format_metrics(config.task.evaluator, metrics), flush=True)
    if flags.FLAGS.output:
      with open(flags.FLAGS.output, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": flags.FLAGS.checkpoint, "task": config.task.to_dict(),
                   "metrics": metrics}, f, indent=2, default=str)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "an evaluation config (configs/eval/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "a training workdir, a converted model directory or a "
                      "transformers directory")
  flags.DEFINE_string("output", "", "also write the metrics to this JSON file")
  flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize() (multi-host)")
  flags.mark_flags_as_required(["config", "checkpoint"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)

