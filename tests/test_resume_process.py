"""The binary as users run it (here with the MLM stage config): killed (SIGKILL) or preempted (SIGTERM) after a checkpoint and
started again with the same workdir, it ends bit-identical to an uninterrupted run, data order
included; so does the default mixed config (paired, image and text corpora) read by grain worker
processes. Bad configs stop at start-up naming the field; so do resumes the checkpoint cannot
take, a second run on a live run's workdir and a workdir that cannot be one. Ctrl-C saves and
exits 0; a diverged run keeps only checkpoints a rerun can use."""

import os
import signal
import subprocess
import sys

import pytest

from flava_jax import trainer, warm_start
from tests.processes import REPO, child_env
from tests.trees import assert_trees_equal

STEPS = 12
OVERRIDES = {"global_batch": 16, "total_steps": STEPS, "log_every_steps": 1,
             "checkpoint.every_steps": 4, "optimizer.warmup_steps": 2}
# configs/flava.py's tiny default (all three corpora, its evaluations at the end) cut to 8 steps,
# checkpoints every 2, with 2 grain worker processes. Seed 0 draws the corpora
# paired text image text | text paired paired image: every kind before and after step 4.
MIXED_STEPS = 8
MIXED = {"global_batch": 16, "total_steps": MIXED_STEPS, "log_every_steps": 1,
         "checkpoint.every_steps": 2, "optimizer.warmup_steps": 2, "data.worker_count": 2}


# The binaries, the uninterrupted references too, run on one CPU device: whether a resumed run
# is exact does not depend on the mesh (the sharded-step tests compare meshes), and one device
# compiles the step in a fraction of 8 fake devices' time.
DEVICES = 1


def _env():
  return child_env(devices=DEVICES)


def _command(workdir, extra=(), config="mlm.py", overrides=None):
  flags = [f"--config.{k}={v}" for k, v in (overrides or OVERRIDES).items()]
  # Mostly the MLM stage config: one batch kind (one compile per process); the mixed config
  # (three kinds) has one test of its own.
  path = config if os.path.isabs(config) else f"{REPO}/configs/{config}"
  return [sys.executable, "-m", "flava_jax.main", f"--config={path}", f"--workdir={workdir}",
          *flags, *extra]


def _start(workdir, extra=(), config="mlm.py", overrides=None, **kwargs):
  return subprocess.Popen(_command(workdir, extra, config, overrides), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _run(workdir, extra=()):
  return subprocess.run(_command(workdir, extra), cwd=REPO, env=_env(), capture_output=True,
                        text=True, check=False)


def _one_error_line(done, *texts):
  """The run failed with exit 1 and one `error:` line holding every text, no traceback."""
  assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
  assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
  errors = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, done.stderr[-2000:]
  for text in texts:
    assert text in errors[0], errors[0]
  return errors[0]


def _read_until(proc, text):
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"the run ended without printing {text!r}:\n{''.join(lines[-30:])}")


def _finish(workdir, config="mlm.py", overrides=None):
  done = subprocess.run(_command(workdir, (), config, overrides), cwd=REPO, env=_env(),
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def _resumed_from(out):
  resumed = [l for l in out.splitlines() if l.startswith("resumed from step")]
  assert len(resumed) == 1, out[-2000:]
  return int(resumed[0].split()[3])


# `configs/NAME.py` without its evaluations, for the uninterrupted runs (the evaluations at the
# end change no parameter).
NO_EVALS = """
import sys
sys.path.insert(0, {repo!r})
from configs import {module}


def get_config(arg=None):
  config = {module}.get_config(arg or "tiny")
  config.evals = {{}}
  return config
"""


def _start_uninterrupted(config, overrides, workdir):
  """The binary's run of `configs/{config}` with `overrides`, without its evaluations, started
  (not waited for). (The binary, not this process: a process with one CPU device and one with 8
  that trains on one of them do not round alike.)

  The SIGKILL tests start it after the kill, beside the restart: the killed run has compiled the
  step by then, and both read it from the session's compilation cache. Started beside the run
  to be killed, it would compile the step a second time, the test's largest cost on 2 busy
  cores."""
  folder = os.path.dirname(workdir)
  os.makedirs(folder, exist_ok=True)
  config_file = os.path.join(folder, f"no_evals_{config}")
  with open(config_file, "w", encoding="utf-8") as f:
    f.write(NO_EVALS.format(repo=REPO, module=config.removesuffix(".py")))
  return _start_logged(_command(workdir, (), config_file, overrides), workdir + ".out")


def _start_logged(command, log):
  """`command` started on DEVICES CPU devices, its output going to the file `log`: no pipe is
  left unread while the test is busy with another run."""
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                            text=True)
  proc.output_file = log
  return proc


def _wait(proc):
  """The output of a run _start_logged started, once it has finished with exit status 0 on
  DEVICES CPU devices."""
  proc.wait(timeout=900)
  with open(proc.output_file, encoding="utf-8") as f:
    out = f.read()
  assert proc.returncode == 0, out[-3000:]
  assert f"on {DEVICES} cpu device(s)" in out, out[:2000]
  return out


def _uninterrupted(config, overrides, workdir):
  """The final parameters of the uninterrupted run (_start_uninterrupted)."""
  _wait(_start_uninterrupted(config, overrides, workdir))
  return warm_start.read_workdir_params(workdir, "reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _uninterrupted("mlm.py", OVERRIDES, str(tmp_path_factory.mktemp("reference") / "run"))


def test_sigkill_after_a_checkpoint_then_restart_is_exact(reference, tmp_path):
  """Also: a second run on the workdir is refused while the first lives (here stopped with
  SIGSTOP, so that it surely does), and the killed run leaves no lock behind."""
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _read_until(proc, "checkpoint 8 saving")  # so checkpoint 4 is complete
  proc.send_signal(signal.SIGSTOP)
  second = _run(workdir)
  _one_error_line(second, f"workdir={workdir!r} is in use by another run (pid {proc.pid} on ")
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
  out = _finish(workdir)
  assert 4 <= _resumed_from(out) < STEPS, out[-2000:]
  assert_trees_equal(warm_start.read_workdir_params(workdir, "run"), reference)


def test_mixed_config_with_grain_workers_resumes_exactly_after_sigkill(tmp_path):
  """The whole process group (the trainer and its 2 grain workers) is killed once checkpoint 2 is
  complete; the restart resumes from a checkpoint, not from step 0, and ends bit-identical."""
  # The uninterrupted reference starts after the kill (see _start_uninterrupted).
  reference_dir = str(tmp_path / "uninterrupted" / "run")
  workdir = str(tmp_path / "run")
  proc = _start(workdir, config="flava.py", overrides=MIXED, start_new_session=True)
  lines = _read_until(proc, "checkpoint 4 saving")  # so checkpoint 2 is complete
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  compiled = {l.split()[2] for l in lines if l.startswith("compiled the ")}
  assert compiled == {"paired", "image", "text"}, "".join(lines[-30:])  # all three drawn
  reference = _start_uninterrupted("flava.py", MIXED, reference_dir)
  out = _finish(workdir, "flava.py", MIXED)
  _wait(reference)
  assert 2 <= _resumed_from(out) < MIXED_STEPS, out[-2000:]
  assert_trees_equal(warm_start.read_workdir_params(workdir, "run"),
                     warm_start.read_workdir_params(reference_dir, "reference"))


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(reference, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  lines = _read_until(proc, "checkpoint 4 saving")
  proc.send_signal(signal.SIGTERM)
  lines += proc.stdout.readlines()
  proc.wait()
  assert proc.returncode == 0, "".join(lines[-30:])
  stopped = [l for l in lines if l.startswith("SIGTERM: saved step")]
  assert stopped, "".join(lines[-30:])
  step = int(stopped[0].split()[3])
  assert 4 <= step < STEPS
  out = _finish(workdir)
  assert f"resumed from step {step} " in out
  assert_trees_equal(warm_start.read_workdir_params(workdir, "run"), reference)


@pytest.mark.parametrize("flag, message", [
    ("--config.globl_batch=3", "globl_batch"),
    ("--config.global_batch=abc", "config.global_batch"),
    ("--config.global_batch=12", "global_batch=12 is not divisible by the data-parallel size 8"),
    ("--config.init.text_from=/no/such/run", "init.text_from='/no/such/run': no such directory"),
    ("--config.optimizer.trainable=('text',)", "optimizer.trainable"),
])
def test_bad_configs_stop_at_start_up_naming_the_field(flag, message, tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "flava_jax.main", f"--workdir={tmp_path}", flag], cwd=REPO,
      env=child_env(), capture_output=True, text=True, check=False)  # 8 devices: data-parallel 8
  assert done.returncode != 0
  assert message in done.stdout + done.stderr
  assert not os.path.exists(tmp_path / trainer.CHECKPOINT_DIR)


def test_ctrl_c_to_the_process_group_saves_and_exits_0_and_resume_refusals_name_the_field(
    tmp_path):
  """Ctrl-C reaches the whole process group (the grain workers too): the run saves and exits 0.
  Restarting with another worker count or model size stops at start-up naming the field (before:
  both checkpoints were taken for corrupt and training restarted from step 0)."""
  workdir = str(tmp_path / "run")
  proc = _start(workdir, ["--config.data.worker_count=1"], start_new_session=True)
  lines = _read_until(proc, "checkpoint 4 saving")
  os.killpg(proc.pid, signal.SIGINT)
  lines += proc.stdout.readlines()
  proc.wait()
  assert proc.returncode == 0, "".join(lines[-30:])
  stopped = [l for l in lines if l.startswith("SIGINT: saved step")]
  assert stopped and "Traceback" not in "".join(lines), "".join(lines[-30:])
  step = int(stopped[0].split()[3])
  checkpoints = os.path.join(workdir, trainer.CHECKPOINT_DIR)
  assert str(step) in os.listdir(checkpoints)
  metrics = open(os.path.join(workdir, trainer.METRICS_FILE)).read()
  _one_error_line(_run(workdir, ["--config.data.worker_count=0"]),
                  f"cannot resume {workdir} from step {step} with another data.worker_count 1 -> 0")
  _one_error_line(_run(workdir, ["--config.data.worker_count=1",
                                 "--config.model.text.hidden_size=32"]),
                  "model.text.hidden_size 64 -> 32")
  assert open(os.path.join(workdir, trainer.METRICS_FILE)).read() == metrics
  assert str(step) in os.listdir(checkpoints)


def test_a_diverged_run_stops_in_one_line_and_keeps_only_usable_checkpoints(tmp_path):
  """lr 1e6 from step 2: the loss leaves its level at step 3 and the parameters become
  non-finite. The checkpoints saved since the loss rose are set aside, not resumed from; the
  rerun with a sane learning rate resumes from the last usable one and trains finitely."""
  workdir = str(tmp_path / "run")
  done = _run(workdir, ["--config.optimizer.learning_rate=1e6", "--config.optimizer.warmup_steps=1",
                        "--config.checkpoint.every_steps=1"])
  error = _one_error_line(done, "the newest usable checkpoint is step 1")
  assert "set aside: 2 -> 2.diverged" in error, error
  names = sorted(os.listdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)))
  assert "1" in names and "2.diverged" in names
  assert not [n for n in names if n.isdigit() and int(n) > 1]  # nothing newer to resume from
  assert not [n for n in names if "tmp" in n]  # no save abandoned half-written
  done = _run(workdir, ["--config.total_steps=4", "--config.checkpoint.every_steps=2"])
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert "resumed from step 1 " in done.stdout
  losses = [float(l.split("text/loss=")[1].split()[0]) for l in done.stdout.splitlines()
            if "text/loss=" in l]
  assert len(losses) == 3 and all(l < 20 for l in losses), done.stdout


def test_an_unusable_workdir_is_one_error_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  _one_error_line(_run(str(path)), f"workdir={str(path)!r} is a file, not a directory")
  _one_error_line(_run(str(path / "run")), "cannot be created")
