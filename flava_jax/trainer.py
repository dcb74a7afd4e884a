"""The training loop `python -m flava_jax.main` runs for every task (flava_jax/tasks/).

    train_and_evaluate(config, workdir) -> final metrics

One step = one batch from one corpus (the data mixture decides), through that kind's jitted,
donated train step. Metrics are fetched one step late (the host never waits for the device),
written as progress lines, to WORKDIR/metrics.jsonl and to TensorBoard event files. The train
state, the data iterator's state and the step go into one Orbax checkpoint every
`checkpoint.every_steps` and at the end; starting again with the same workdir resumes exactly
(the step rng is folded from the seed and the step). SIGTERM (TPU preemption) saves and exits.
A NaN/Inf loss stops the run naming the step and the loss; the last good checkpoint stays.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from flava_jax import (binary, evals, evaluate, experiment, flops, multihost, progress, stopping,
                       train, warm_start)
from flava_jax import workdir as workdir_lib
from flava_jax.data import checkpointing as data_checkpointing
from flava_jax.data import pipeline
from flava_jax.model_summary import num_parameters

CHECKPOINT_DIR = warm_start.CHECKPOINT_DIR
METRICS_FILE = progress.METRICS_FILE
RUN_CONFIG = warm_start.RUN_CONFIG


class NonFiniteLoss(RuntimeError):
  """A step's loss is NaN or Inf: the run stops (its message says which checkpoint is kept)."""

  def __init__(self, message: str, step: int, losses: list[tuple[int, str, float]] = ()):
    super().__init__(message)
    self.step = step
    self.losses = list(losses)  # (step, corpus, loss) of the steps before it


class NonFiniteState(NonFiniteLoss):
  """The state to be saved holds NaN or Inf: it is not saved, the run stops."""


CheckpointConfig = experiment.CheckpointConfig
init_key = experiment.init_key


def check_config(config: Any) -> None:
  """Every start-up check of a training config that needs no data read and no compile: field
  names and types of every section (the task's and the trainer's), init paths, the mesh and the
  batch split. Errors name the field."""
  experiment.Experiment(config)


def _write_replicas_whole() -> None:
  """In one process, orbax writes a replicated array's bytes once, from one device, instead of
  cutting it into one slice per replica (its default, "replica-parallel"). Those slices spread
  the writing over the hosts of a multi-host job; in one process they are all this host's, and
  cost a slice program per array shape, compiled at the first save (on the tiny configs' data=8
  mesh: about 200 programs and 5 s, then 2-3 s of dispatches every save). Multi-host jobs keep
  orbax's default. The checkpoint's contents and layout are the same either way."""
  if jax.process_count() > 1:
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if not getattr(current, "_use_replica_parallel", True):
    return  # already (or orbax's default on GPU)
  handler = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False,
      array_metadata_store=getattr(current, "_array_metadata_store", None))
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # not orbax's warning that a handler is replaced
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)


def _manager(workdir: str, cfg: CheckpointConfig) -> ocp.CheckpointManager:
  _write_replicas_whole()
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep,
                                         enable_async_checkpointing=cfg.async_save)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": data_checkpointing.DataHandler()})


class Session:
  """One start of a run on its workdir: the lock, the stop signals, and what changed.

  Opened before anything is written or started (data workers included): the workdir is checked
  (a file or an unwritable path fails in one line) and locked against a second run; SIGTERM and
  SIGINT become stop requests; when the workdir holds checkpoints, the config is compared with
  the one they were written under and a change a resume cannot take stops here, naming the
  fields (workdir.RESUME_CHANGES lists those it takes). `record(step)` keeps this start's config
  (run_configs/, run_config.json) once the run knows where it starts.
  """

  def __init__(self, config: Any, workdir: str):
    self.config = config
    self.workdir = workdir
    self.config_json = workdir_lib.config_dict(config)
    self.previous = None
    self.changes: list[tuple[str, Any, Any]] = []
    self.notes: list[str] = []
    self.stop = stopping.StopRequests()
    self._lock = None

  def __enter__(self) -> "Session":
    error = None
    try:
      self.workdir = workdir_lib.prepare(self.workdir)
      if multihost.is_primary():
        self._lock = workdir_lib.Lock(self.workdir).acquire()
      steps = warm_start.checkpoint_steps(self.workdir)
      if steps:
        self.previous = workdir_lib.read_run_config(self.workdir)
        if self.previous is not None:
          newest = steps[0]
          self.changes = workdir_lib.changes(self.previous, self.config_json)
          self.notes = workdir_lib.check_resume(self.previous, self.config_json, newest,
                                                self.workdir)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, in every process)
      error = e
    # Every process starts, or none does (the lock is process 0's alone).
    if multihost.any_true(error is not None):
      self._release()
      if error is not None:
        raise error
      raise workdir_lib.WorkdirError(
          f"another process of this job could not start on {self.workdir} (its output says why)")
    self.stop.__enter__()
    return self

  def record(self, step: int) -> None:
    """This start's config, kept; the accepted changes said (when resuming)."""
    if jax.process_index() != 0:
      return
    workdir_lib.record_start(self.workdir, self.config_json, step)
    if step and self.notes:
      print(f"resuming with {len(self.notes)} changed field(s):", flush=True)
      for note in self.notes:
        print(f"  {note}", flush=True)

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def __exit__(self, *exc) -> None:
    self.stop.__exit__()
    self._release()


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                    data: pipeline.DataIterator, changed: list[str]
                    ) -> tuple[Any, int] | None:
  """The newest checkpoint every process can read, or None when there is none.

  A checkpoint that does not fit this config (other array shapes, or a data-iterator state this
  pipeline cannot take) stops the run naming the changed fields: falling back to an older one
  would only fail the same way. A damaged one (unreadable files) is renamed STEP.unreadable
  (kept, said on stdout) and the next older one is tried. The processes of a job decide
  together: a checkpoint that one of them cannot read is damaged for all of them, so that every
  process falls back to the same step.
  """
  checkpoint_dir = str(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    error = restored = None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=data_checkpointing.DataRestore(data)))
      if isinstance(restored["data"], data_checkpointing.Unreadable):
        error = restored["data"].error
    except Exception as e:  # pylint: disable=broad-except  (Orbax and grain raise many types)
      error = e
    if not multihost.any_true(error is not None):
      return restored["state"], step
    why = _incompatible(manager, step, abstract_state, error)  # in every process: it restores
    if multihost.any_true(bool(why)):
      fields = ", ".join(changed) or "none (was it written by another version of the code?)"
      why = why or "another process of this job found that it does not fit (its output says why)"
      raise workdir_lib.ResumeRefused(
          f"checkpoint {step} in {checkpoint_dir} does not fit this config: {why}. Config "
          f"fields changed since it was written: {fields}. Resume with the checkpoint's config "
          "or use a new workdir")
    reason = (_one_line(error) if error is not None
              else "another process of this job could not read it")
    logging.warning("checkpoint %d cannot be restored: %s", step, reason)
    if multihost.is_primary():
      moved = workdir_lib.set_aside(checkpoint_dir, step, "unreadable")
      print(f"warning: checkpoint {step} cannot be read ({reason}); set aside as "
            f"{moved}; trying an older one", flush=True)
    multihost.barrier(f"set_aside_{step}")
    manager.reload()
  return None


def _incompatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  error: Exception | None) -> str:
  """Why a checkpoint that failed to restore (in this process: `error`, or in another) does
  not fit the config ("" when it is damaged). Every process of the job calls it: it reads the
  same files in each, and its restore is collective."""
  try:
    saved = manager.item_metadata(step)["state"]
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: damaged)
    return ""
  mismatch = workdir_lib.state_mismatch(saved, abstract_state) if saved is not None else []
  if mismatch:
    return "its arrays differ (" + "; ".join(mismatch) + ")"
  # The arrays fit; is it the data state? Restore the state alone to tell.
  try:
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception:  # pylint: disable=broad-except  (array files unreadable: damaged)
    return ""
  data_dir = os.path.join(str(manager.directory), str(step), "data")
  for name in os.listdir(data_dir) if os.path.isdir(data_dir) else ():
    try:
      with open(os.path.join(data_dir, name), encoding="utf-8") as f:
        if name.endswith(".json"):
          json.load(f)
    except (OSError, ValueError):
      return ""  # a data state's file is damaged
  cause = _one_line(error) if error is not None else "another process could not take its own"
  return f"the saved data-iterator state does not fit this input pipeline ({cause})"


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_all_finite_jit = jax.jit(_all_finite)


def _newest_step(manager: ocp.CheckpointManager) -> int | None:
  steps = manager.all_steps()
  return max(steps) if steps else None


DIVERGED_FACTOR = 10.0  # a loss above this multiple of its corpus's usual loss has diverged


def divergence_onset(losses: list[tuple[int, str, float]], last: int) -> int:
  """The step at which the run's losses left their usual level for good, up to step `last`.

  losses: (step, corpus, loss) of the steps before the stop. A corpus's usual level is the lower
  quartile of its losses (robust to the rise itself); walking back from `last`, every step whose
  loss exceeds DIVERGED_FACTOR times its corpus's level belongs to the divergence. With no such
  step the onset is the step after `last`.
  """
  by_corpus = collections.defaultdict(list)
  for _, corpus, loss in losses:
    by_corpus[corpus].append(loss)
  level = {c: sorted(v)[len(v) // 4] for c, v in by_corpus.items()}
  onset = last + 1
  for step, corpus, loss in sorted(losses, reverse=True):
    if step > last:
      continue
    if loss > DIVERGED_FACTOR * max(level[corpus], 1e-6):
      onset = step
    else:
      break
  return onset


def _non_finite_message(manager: ocp.CheckpointManager, error: NonFiniteLoss) -> str:
  """The stop's one line, true about which checkpoint a rerun resumes from.

  A checkpoint holds the parameters its next step's loss was computed from: those saved after
  the divergence began (the steps whose loss rose far above its usual level, then the
  non-finite one) gave diverged losses and are set aside (STEP.diverged, kept on disk), so that
  a rerun resumes from the newest one whose next loss was still usual.
  """
  step = error.step
  last_loss = step if isinstance(error, NonFiniteState) else step - 1  # losses known finite
  onset = divergence_onset(error.losses, last_loss)
  moved = []
  if jax.process_index() == 0:
    for saved in sorted(manager.all_steps()):
      if saved >= onset - 1:
        aside = workdir_lib.set_aside(str(manager.directory), saved, "diverged")
        moved.append(f"{saved} -> {os.path.basename(aside)}")
  multihost.barrier("set_aside_diverged")
  manager.reload()
  note = ""
  if onset <= last_loss:
    note = (f"; the loss had risen over {DIVERGED_FACTOR:g}x its usual level from step {onset}")
  if moved:
    note += f"; checkpoints saved since then set aside: {', '.join(moved)}"
  newest = _newest_step(manager)
  kept = (f"the newest usable checkpoint is step {newest}: a rerun resumes from it (lower "
          "optimizer.learning_rate or set optimizer.grad_clip_norm)" if newest is not None
          else "no usable checkpoint was saved: a rerun starts from step 0")
  return f"step {step}: {error}{note}; {kept}"


@dataclasses.dataclass
class Run:
  """What the step loop needs: a sharded state, one jitted step per batch kind, the data."""

  config: experiment.RunConfig
  workdir: str
  mesh: Any
  data: pipeline.DataIterator
  state: Any                      # its shapes and shardings are what checkpoints restore into
  steps: dict[str, Any]           # step kind -> step(state, batch, rng) -> (state, metrics)
  step_flops: dict[str, float]    # step kind -> FLOPs of one step at the global batch
  step_kind: Any                  # corpus kind -> step kind (the task's)
  schedule: Any
  checkpoint: CheckpointConfig
  rng: Any
  session: Session
  on_fresh_start: Any = None      # state -> state, when no checkpoint is resumed (config.init)
  host_batch: Any = None          # (step kind, host batch) -> what the step reads (the task's)
  evaluate: Any = None            # Evaluations: the evals due at a step, on the current params
  final_evals: int = 0            # evaluations after the last step (for the ETA)



def run_loop(run: Run, stop_after: int | None = None) -> tuple[Any, int, str]:
  """Resumes, trains to config.total_steps (or stop_after more steps), checkpoints.

  Returns (state, step reached, why it stopped early: "" when it reached total_steps). Every
  exit path waits for the checkpoint being written and stops the data workers.
  """
  config, data = run.config, run.data
  manager = _manager(run.workdir, run.checkpoint)
  writer = None
  try:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    restored = _restore_latest(manager, abstract, data,
                               [field for field, _, _ in run.session.changes])
    state = run.state
    if restored is not None:
      state, start = restored
      multihost.say(f"resumed from step {start} in {run.workdir}")
    elif run.on_fresh_start is not None:
      state = run.on_fresh_start(state)
    first = int(jax.device_get(state.step))
    run.session.record(first)
    writer = progress.MetricWriter(run.workdir, config.total_steps)
    return _train(run, manager, writer, state, first, stop_after)
  except (NonFiniteLoss, NonFiniteState) as e:
    _wait(manager)
    raise type(e)(_non_finite_message(manager, e), e.step) from None
  finally:
    _wait(manager)
    manager.close()
    data.close()
    if writer is not None:
      writer.close()


def _wait(manager: ocp.CheckpointManager) -> None:
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (reported, the exit goes on)
    print(f"warning: the checkpoint being written could not be finished ({_one_line(e)})",
          flush=True)


def _train(run: Run, manager: ocp.CheckpointManager, writer: progress.MetricWriter, state: Any,
           first: int, stop_after: int | None) -> tuple[Any, int, str]:
  config, data, stop = run.config, run.data, run.session.stop
  total = config.total_steps
  stop_at = total if stop_after is None else min(first + stop_after, total)
  peak = flops.peak_flops_per_device(run.mesh.devices.flat[0])
  devices = run.mesh.size
  step_rng = jax.random.fold_in(run.rng, 2)
  clock = progress.StepClock()
  schedule = jax.jit(run.schedule)  # one compile, not one per jnp op of the schedule
  means = progress.CorpusMeans()
  interval = dict(seconds=0.0, flops=0.0, steps=0)
  skips = progress.SkipRates(data.kinds, config.global_batch // jax.process_count())
  skips.take(data.skipped, data.batches)  # counts restored with the data state are not news
  compiled: set[str] = set()
  kinds = {run.step_kind(k) for k in data.kinds.values()}
  every = run.checkpoint.every_steps
  pending = None  # (step, corpus, device metrics, stop vote): fetched one step late
  losses = collections.deque(maxlen=10_000)  # (step, corpus, loss): where a divergence began
  # A stop signal reaches each process at its own time; the processes stop after the same step,
  # the first whose vote (fetched with the metrics) says that one of them was asked to.
  votes = multihost.StopVotes()
  agreed = {"stop": ""}

  def evals_left(step):
    if run.evaluate is None:
      return 0
    return run.evaluate.calls_between(step, total) + run.final_evals

  def flush(item):
    step, corpus, metrics, vote = item
    host = jax.device_get(metrics)
    agreed["stop"] = agreed["stop"] or stopping.name_of(votes.read(vote))
    seconds = clock.ready(step)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLoss(f"loss is {loss} on the {corpus} batch "
                          f"({ {k: float(v) for k, v in host.items()} })", step, losses)
    losses.append((step, corpus, loss))
    means.add(corpus, host)
    interval["seconds"] += seconds
    interval["flops"] += run.step_flops[run.step_kind(data.kinds[corpus])]
    interval["steps"] += 1
    if step % config.log_every_steps == 0 or step == total:
      out = means.take()
      seconds, n = interval["seconds"], interval["steps"]
      out.update(examples_per_s=config.global_batch * n / seconds,
                 step_seconds=seconds / n,
                 learning_rate=float(schedule(step - 1)),
                 tflops_per_device=interval["flops"] / seconds / devices / 1e12)
      if peak:
        out["mfu"] = interval["flops"] / seconds / devices / peak
      skipped = multihost.sum_counts(data.skipped)  # the job's totals
      out.update({f"skipped/{k}": v for k, v in skipped.items()})
      rates, warnings = skips.take(skipped, multihost.sum_counts(data.batches))
      out.update({f"skip_rate/{c}": rate for c, rate in rates.items() if rate > 0})
      interval.update(seconds=0.0, flops=0.0, steps=0)
      saves_left = len(range((step // every + 1) * every, total, every)) + (step < total)
      guess = sum(compile_times) / len(compile_times) if compile_times else None
      writer.write(step, out, eta=clock.eta(total - step, len(kinds - compiled), saves_left,
                                            evals_left(step), guess))
      for warning in warnings:
        multihost.say(f"warning: {warning}")

  def save(step):
    with clock.paused("save"):
      if not bool(_all_finite_jit(state)):
        raise NonFiniteState("the updated parameters or optimizer state hold NaN or Inf (the "
                             "step's loss was finite); not saved", step, losses)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=data_checkpointing.DataSave(data)),
          force=True)
    multihost.say(f"checkpoint {step} saving")

  step = first
  # A signal during start-up (to any process): nothing has been trained since the checkpoint.
  early = stopping.name_of(multihost.max_int(stopping.code_of(stop.requested)))
  if early:
    multihost.say(f"{early}: stopped before the first step (nothing new to save)")
    return state, step, early
  compile_times = []
  schedule(first)  # compiled before the clock runs
  with clock.listening():
    while step < total:
      clock.begin(step + 1)
      corpus, batch = next(data)
      kind = run.step_kind(data.kinds[corpus])
      if run.host_batch is not None:
        batch = run.host_batch(kind, batch)
      if kind not in compiled and pending is not None:
        flush(pending)  # the previous step ends before a compile holds the host up
        pending = None
      compiled_before = clock.compile_seconds
      state, metrics = run.steps[kind](state, pipeline.to_global(batch, run.mesh), step_rng)
      seconds = clock.compile_seconds - compiled_before
      if kind not in compiled or seconds > 1.0:  # the first call of a kind's step compiles it
        compile_times.append(seconds)
        writer.write(step + 1, {f"compile_seconds/{kind}": seconds}, progress=False)
        multihost.say(f"{'re' if kind in compiled else ''}compiled the {kind} step in "
                      f"{seconds:.1f}s")
        compiled.add(kind)
      vote = votes.cast(stopping.code_of(stop.requested))
      step += 1
      if pending is not None:
        flush(pending)
      pending = (step, corpus, metrics, vote)
      save_due = step % every == 0 or step == total
      eval_due = run.evaluate is not None and step < total and run.evaluate.due(step)
      if save_due or eval_due or agreed["stop"] or step == stop_at:
        flush(pending)  # before a save (a checkpoint holds only finite steps) or an evaluation
        pending = None
      if eval_due:
        results = run.evaluate(step, state.params, clock=clock)
        if results:
          writer.write(step, results, progress=False)
      stop_now = agreed["stop"] or ("stop_after" if step == stop_at and step < total else "")
      if save_due or stop_now:
        save(step)
      if stop_now and step < total:
        manager.wait_until_finished()
        print(f"{stop_now}: saved step {step} and stopped", flush=True)  # every process
        return state, step, stop_now
  return state, step, ""


def write_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
  writer = progress.MetricWriter(workdir, step, tensorboard=False)
  writer.write(step, metrics, progress=False)
  writer.close()


def final_metrics_logged(workdir: str, step: int, prefix: str) -> bool:
  """Whether metrics.jsonl holds a row of `prefix*` metrics at `step` (a rerun skips them)."""
  return any(row.get("step") == step and any(k.startswith(prefix) for k in row)
             for row in progress.logged_steps(workdir))


def run_binary(argv, check, train_fn) -> None:
  """The body of the training binary (flava_jax.main): joins the other processes
  when --multiprocess, logs the topology, stops with a one-line usage error on a bad config,
  then trains with --config and --workdir. A workdir that cannot be used, a resume the config
  does not allow and a non-finite loss end in one `error:` line and exit 1; a second Ctrl-C in
  exit 130 without saving."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel,g-multiple-import
  binary.start(argv)
  try:
    check(flags.FLAGS.config)
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise app.UsageError(f"bad config: {e}") from None
  try:
    train_fn(flags.FLAGS.config, flags.FLAGS.workdir)
  except (workdir_lib.WorkdirError, NonFiniteLoss, NonFiniteState) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    binary.exit(1)
  except KeyboardInterrupt:
    print("error: interrupted by a second SIGINT: stopped without saving the steps since the "
          "last checkpoint", file=sys.stderr, flush=True)
    binary.exit(130)


class Evaluations:
  """A run's evaluators by name (config.evals): `due(step)`, and `(step, params)` ->
  {"eval/NAME/metric": value} of those due at that step."""

  def __init__(self, evaluators: dict[str, Any]):
    self.evaluators = evaluators

  @staticmethod
  def _due(evaluator: Any, step: int) -> bool:
    every = evaluator.cfg.every_steps
    return bool(every) and step % every == 0

  def due(self, step: int) -> bool:
    return any(self._due(e, step) for e in self.evaluators.values())

  def calls_between(self, step: int, total: int) -> int:
    """Periodic evaluations due after `step` and before `total`."""
    return sum(len(range((step // e.cfg.every_steps + 1) * e.cfg.every_steps, total,
                         e.cfg.every_steps))
               for e in self.evaluators.values() if e.cfg.every_steps)

  def run_one(self, name: str, step: int, params: Any,
              clock: progress.StepClock | None = None) -> dict[str, float]:
    with clock.paused("evaluation") if clock is not None else contextlib.nullcontext():
      metrics = self.evaluators[name](params)
    if jax.process_index() == 0:
      print(f"step {step} " + evaluate.format_metrics(f"eval {name}", metrics), flush=True)
    return {f"eval/{name}/{k}": v for k, v in metrics.items()}

  def __call__(self, step: int, params: Any,
               clock: progress.StepClock | None = None) -> dict[str, float]:
    """The evaluations due at `step` (the final ones: final_evaluations)."""
    out = {}
    for name, evaluator in self.evaluators.items():
      if self._due(evaluator, step):
        out.update(self.run_one(name, step, params, clock))
    return out


def make_evaluations(exp: experiment.Experiment) -> Evaluations:
  """config.evals built on the task's predict functions, their splits opened and checked."""
  if not exp.run.evals:
    return Evaluations({})
  ctx = evaluate.make_context(
      exp.task, exp.mesh, exp.rules, exp.run.data.vocab_file, exp.run.data.cache_dir,
      load_frozen=lambda: exp.task.init_frozen(exp.run.seed, exp.run.init,
                                               tuple(c.kind for c in exp.run.corpora.values())))
  return Evaluations({name: evals.build_parsed(cfg, ctx, f"evals.{name}")
                      for name, cfg in exp.run.evals.items()})


def final_evaluations(evaluations: Evaluations, workdir: str, step: int, params: Any,
                      stop: stopping.StopRequests) -> tuple[dict[str, float], str]:
  """The evaluations after the last step that metrics.jsonl does not hold yet, each written as
  soon as it is done; a stop signal ends them between two (a rerun does the rest).
  Returns (metrics, the stop signal's name or "")."""
  results = {}
  multihost.barrier("final_evaluations")  # metrics.jsonl (process 0 writes it) read by all
  names = [n for n in evaluations.evaluators
           if not final_metrics_logged(workdir, step, f"eval/{n}/")]
  for i, name in enumerate(names):
    requested = stopping.name_of(multihost.max_int(stopping.code_of(stop.requested)))
    if requested:
      multihost.say(f"{requested}: stopped during the final evaluation; "
                    f"{', '.join(names[i:])} left for a rerun (training is complete)")
      return results, requested
    metrics = evaluations.run_one(name, step, params)
    write_metrics(workdir, step, metrics)
    results.update(metrics)
  done = [n for n in evaluations.evaluators if n not in names]
  if done:
    multihost.say(f"final evaluation{'s' if len(done) > 1 else ''} {', '.join(done)} already "
                  f"in {progress.METRICS_FILE}: not run again")
  return results, ""


def train_and_evaluate(config: Any, workdir: str, stop_after: int | None = None
                       ) -> dict[str, Any]:
  """Trains for config.total_steps (resuming from workdir), then evaluates; returns metrics.

  stop_after: save a checkpoint and return after this many steps of this call (as a preempted
  run does); a later call with the same workdir carries on. A stopped run returns
  {"stopped_at": step, "state": ...}.
  """
  exp = experiment.Experiment(config)  # every start-up check, before the workdir is touched
  settings, task = exp.run, exp.task
  with Session(config, workdir) as session:
    workdir = session.workdir
    mesh = exp.mesh
    data = exp.pipeline()  # start-up errors of the data come before any compile
    try:
      evaluations = make_evaluations(exp)  # and of the held-out splits
      state = exp.create_state()
      frozen = exp.frozen(tuple(data.kinds.values()))
    except BaseException:
      data.close()
      raise
    if jax.process_index() == 0:
      accum = settings.grad_accum
      frozen_note = "".join(
          f"; {name} from {settings.init[field]}" if settings.init.get(field)
          else f"; {name} random (init.{field} not set)"
          for field, name in task.FROZEN_STARTS.items()) if frozen is not None else ""
      print(f"{task.describe(state.params)} {settings.variant}: "
            f"{num_parameters(state.params):,} parameters; mesh {dict(mesh.shape)} on "
            f"{mesh.size} {mesh.devices.flat[0].platform} device(s)"
            + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
            + f"; corpora {data.kinds}; "
            f"global batch {settings.global_batch}"
            + (f" in {accum} micro-batches" + (" (GradCache)" if settings.grad_cache else "")
               if accum > 1 else "") + frozen_note, flush=True)

    def fresh_start(state):
      params, notes = warm_start.initial_params(state.params, settings.init, task.WARM_STARTS)
      for note in notes:
        multihost.say(f"init: {note}")
      return state.replace(params=params, extra=task.warm_started(params, state.extra))

    steps = {}
    for kind in task.step_kinds(data.kinds.values()):
      steps[kind] = functools.partial(lambda f, s, b, r: f(s, frozen, b, r), exp.train_step(kind))
    run = Run(config=settings, workdir=workdir, mesh=mesh, data=data, state=state, steps=steps,
              step_flops={kind: exp.step_flops(kind) for kind in steps},
              step_kind=task.step_kind,
              schedule=train.learning_rate_schedule(settings.optimizer, settings.total_steps),
              checkpoint=settings.checkpoint, rng=jax.random.key(settings.seed), session=session,
              on_fresh_start=fresh_start, host_batch=task.host_batch, evaluate=evaluations,
              final_evals=len(evaluations.evaluators))
    state, step, stopped = run_loop(run, stop_after)
    if stopped:
      return {"stopped_at": step, "state": state}
    results, stopped = final_evaluations(evaluations, workdir, step, state.params, session.stop)
    if stopped:
      results["stopped_at"] = step
    results["state"] = state
    return results
