"""The training loop on 8 fake CPU devices: losses fall, metrics are written, a run stopped
after a checkpoint and restarted ends bit-identical to an uninterrupted one, a damaged newest
checkpoint is set aside, a resume the checkpoint cannot take stops at start-up, and the final
evaluation survives SIGTERM and is never repeated."""

import json
import os
import shutil
import signal

import jax
import pytest

from configs import flava
from flava_jax import trainer
from flava_jax import workdir as workdir_lib
from tests.trees import assert_trees_equal


def small_config(steps=6):
  """Two corpora (so per-corpus figures are means over the steps that drew each), a log line
  every 2 steps, a checkpoint every 3."""
  config = flava.get_config("tiny")
  config.global_batch = 16
  config.total_steps = steps
  config.log_every_steps = 2
  config.checkpoint.every_steps = 3
  config.checkpoint.async_save = False
  config.evals = {}
  config.optimizer.warmup_steps = 2
  config.data.corpora = {"paired": dict(config.data.corpora.paired.to_dict(), weight=0.5),
                         "text": dict(config.data.corpora.text.to_dict(), weight=0.5)}
  return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 6-step run: (its workdir, its final parameters on the host)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = trainer.train_and_evaluate(small_config(), workdir)
  assert int(result["state"].step) == 6
  return workdir, jax.device_get(result["state"].params)


def _copy(workdir, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


def _step_rows(workdir):
  """metrics.jsonl's training log lines (compile and evaluation rows left out), in file order."""
  with open(os.path.join(workdir, trainer.METRICS_FILE)) as f:
    return [r for r in map(json.loads, f) if "examples_per_s" in r]


def test_exact_resume_after_a_stop(straight, tmp_path):
  """The second start restores step 4 and trains only steps 5 and 6 (a restart from step 0 that
  trained all six steps again would end with the same parameters)."""
  config = small_config()
  workdir = str(tmp_path / "resumed")
  first = trainer.train_and_evaluate(config, workdir, stop_after=4)
  assert first["stopped_at"] == 4 and int(first["state"].step) == 4
  assert "4" in os.listdir(os.path.join(workdir, trainer.CHECKPOINT_DIR))
  logged_by_first = len(_step_rows(workdir))
  resumed = trainer.train_and_evaluate(config, workdir)
  assert int(resumed["state"].step) == 6
  assert_trees_equal(resumed["state"].params, straight[1])
  # The second start began at the checkpoint's step...
  assert sorted(os.listdir(os.path.join(workdir, workdir_lib.HISTORY_DIR))) == [
      "start-0001-step-0.json", "start-0002-step-4.json"]
  # ...and its log lines count the two steps it trained, no more.
  rows = _step_rows(workdir)
  assert [r["step"] for r in rows] == [2, 4, 6]
  second = rows[logged_by_first:]
  assert [r["step"] for r in second] == [6]
  assert sum(r.get("paired/steps", 0) + r.get("text/steps", 0) for r in second) == 2
  assert os.listdir(os.path.join(straight[0], "tensorboard"))


def test_metrics_are_per_corpus_means_and_step_times_leave_out_compiles(straight):
  """Each corpus's figures at a log line are the means over its steps since the line before
  (before: one step's sample, so a corpus drawn only between two lines never appeared); step
  times leave compiles out, compile time is its own metric; names are TensorBoard's too."""
  rows = [json.loads(l) for l in open(os.path.join(straight[0], trainer.METRICS_FILE))]
  logged = [r for r in rows if "examples_per_s" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  assert sum(r.get("paired/steps", 0) + r.get("text/steps", 0) for r in logged) == 6
  assert all(r["examples_per_s"] > 0 for r in logged)
  compiles = {k: v for r in rows for k, v in r.items() if k.startswith("compile_seconds/")}
  assert set(compiles) == {"compile_seconds/paired", "compile_seconds/text"}
  # the trainer's clock hears JAX's compile events (a compile's seconds come only from them);
  # that the clock leaves them out of step times is test_workdir's fake-clock test (comparing
  # measured times here failed once on a loaded CI machine)
  assert all(v > 0 for v in compiles.values())
  from tensorboardX.summary import _clean_tag  # pylint: disable=import-outside-toplevel
  assert all(_clean_tag(k) == k for r in rows for k in r)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_finishes(straight, tmp_path,
                                                                        capsys):
  """Truncated array files (a full disk, a killed copy): the restart renames the step, resumes
  from the older one and ends where an uninterrupted run ends; nothing is deleted."""
  workdir = _copy(straight[0], tmp_path)
  newest = os.path.join(workdir, trainer.CHECKPOINT_DIR, "6")
  truncated = 0
  for root, _, files in os.walk(os.path.join(newest, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 10_000:
        with open(path, "r+b") as f:
          f.truncate(100)
        truncated += 1
  assert truncated
  result = trainer.train_and_evaluate(small_config(), workdir)
  out = capsys.readouterr().out
  assert "checkpoint 6 cannot be read" in out and "resumed from step 3" in out
  assert int(result["state"].step) == 6
  assert_trees_equal(result["state"].params, straight[1])
  steps = sorted(os.listdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)))
  assert "6.unreadable" in steps and "6" in steps and "3" in steps  # 6 saved anew


@pytest.mark.parametrize("field, value", [("model.image.hidden_size", 32),
                                          ("data.worker_count", 2), ("seed", 7)])
def test_a_resume_the_checkpoint_cannot_take_stops_at_start_up_naming_the_field(
    straight, tmp_path, field, value):
  workdir = _copy(straight[0], tmp_path)
  before = {name: open(os.path.join(workdir, name)).read()
            for name in (trainer.METRICS_FILE, trainer.RUN_CONFIG)}
  config = small_config(steps=8)
  section, _, name = field.rpartition(".")
  node = config
  for part in filter(None, section.split(".")):
    node = node[part]
  node[name] = value
  with pytest.raises(workdir_lib.ResumeRefused, match=f"cannot resume .* from step 6 with "
                     f"another {field.replace('.', '[.]')}"):
    trainer.train_and_evaluate(config, workdir)
  for name, text in before.items():  # nothing of the run is touched
    assert open(os.path.join(workdir, name)).read() == text
  assert sorted(os.listdir(os.path.join(workdir, trainer.CHECKPOINT_DIR))) == ["3", "6"]


def test_a_state_that_does_not_fit_is_refused_not_taken_for_damage(straight, tmp_path):
  """A change the field table lets through but the arrays cannot take (here a run_config.json
  edited to match, as another code version could leave it) names the arrays, renames nothing."""
  workdir = _copy(straight[0], tmp_path)
  config = small_config()
  config.model.text.mlp_dim = 96
  recorded = json.load(open(os.path.join(workdir, trainer.RUN_CONFIG)))
  recorded["model"]["text"]["mlp_dim"] = 96
  json.dump(recorded, open(os.path.join(workdir, trainer.RUN_CONFIG), "w"))
  with pytest.raises(workdir_lib.ResumeRefused,
                     match=r"checkpoint 6 .* does not fit this config: its arrays differ"):
    trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, trainer.CHECKPOINT_DIR))) == ["3", "6"]


def test_accepted_changes_are_said_and_every_start_config_is_kept(straight, tmp_path, capsys):
  workdir = _copy(straight[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, trainer.CHECKPOINT_DIR, "6"))  # resume from step 3
  config = small_config()
  config.data.corpora.paired.weight = 0.3
  config.log_every_steps = 1
  result = trainer.train_and_evaluate(config, workdir)
  assert int(result["state"].step) == 6
  out = capsys.readouterr().out
  assert "resuming with 2 changed field(s)" in out
  for field in ("data.corpora.paired.weight 0.5 -> 0.3: the mixture draws",
                "log_every_steps 2 -> 1: "):
    assert field in out, out
  history = sorted(os.listdir(os.path.join(workdir, workdir_lib.HISTORY_DIR)))
  assert history == ["start-0001-step-0.json", "start-0002-step-3.json"]
  first = json.load(open(os.path.join(workdir, workdir_lib.HISTORY_DIR, history[0])))
  assert first["log_every_steps"] == 2 and first["data"]["corpora"]["paired"]["weight"] == 0.5
  assert json.load(open(os.path.join(workdir, trainer.RUN_CONFIG)))["log_every_steps"] == 1


class _FakeEvaluator:
  """Counts its calls; a call can deliver SIGTERM to this process, as a TPU host's maintenance
  event would during the final evaluation."""

  def __init__(self, send_sigterm=False):
    self.cfg = type("Cfg", (), {"every_steps": 0})()
    self.calls = 0
    self.send_sigterm = send_sigterm

  def __call__(self, params):
    del params
    self.calls += 1
    if self.send_sigterm:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"score": float(self.calls)}


def test_sigterm_in_the_final_evaluation_exits_cleanly_and_a_rerun_does_only_the_rest(
    straight, tmp_path, monkeypatch, capsys):
  workdir = _copy(straight[0], tmp_path)
  fakes = {"first": _FakeEvaluator(send_sigterm=True), "second": _FakeEvaluator()}
  monkeypatch.setattr(trainer, "make_evaluations", lambda *a: trainer.Evaluations(fakes))
  result = trainer.train_and_evaluate(small_config(), workdir)
  assert result["stopped_at"] == 6 and "eval/first/score" in result
  assert "SIGTERM: stopped during the final evaluation; second left" in capsys.readouterr().out
  assert (fakes["first"].calls, fakes["second"].calls) == (1, 0)
  fakes["first"].send_sigterm = False
  result = trainer.train_and_evaluate(small_config(), workdir)  # does only what is missing
  assert "stopped_at" not in result and result["eval/second/score"] == 1.0
  assert (fakes["first"].calls, fakes["second"].calls) == (1, 1)
  trainer.train_and_evaluate(small_config(), workdir)  # finished: nothing runs again
  assert (fakes["first"].calls, fakes["second"].calls) == (1, 1)
  rows = [json.loads(l) for l in open(os.path.join(workdir, trainer.METRICS_FILE))]
  assert sum("eval/first/score" in r for r in rows) == 1
  assert sum("eval/second/score" in r for r in rows) == 1
  assert [r["step"] for r in rows if "examples_per_s" in r] == [2, 4, 6]  # no re-training


def test_batch_not_divisible_by_the_data_parallel_size_fails_at_start_up(tmp_path):
  config = small_config()
  config.global_batch = 12
  with pytest.raises(ValueError, match="global_batch=12 is not divisible by the data-parallel"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_bf16_first_moment_option():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flava_jax import train  # pylint: disable=import-outside-toplevel
  params = {"layer": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}}
  decays = lambda path: path[-1] == "kernel"
  for dtype in ("float32", "bfloat16"):
    tx = train.make_optimizer(dict(learning_rate=1e-3, warmup_steps=1, mu_dtype=dtype), 10,
                              decays, ("layer",))
    mu = tx.init(params)[0].mu["layer"]
    assert mu["kernel"].dtype == jnp.dtype(dtype) and mu["bias"].dtype == jnp.dtype(dtype)
  with pytest.raises(ValueError, match="optimizer.mu_dtype='float16'"):
    train.make_optimizer(dict(mu_dtype="float16"), 10, decays, ("layer",))


def test_resuming_with_another_dvae_is_said():
  before = {"init": {"dvae_from": "/runs/dvae"}, "total_steps": 4}
  after = {"init": {"dvae_from": ""}, "total_steps": 4}
  notes = workdir_lib.check_resume(before, after, 4, "/w")
  assert len(notes) == 1 and notes[0].startswith('init.dvae_from "/runs/dvae" -> "":')
  assert "MIM/MMM targets" in notes[0]
