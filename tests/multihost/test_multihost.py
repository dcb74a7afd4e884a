"""Real multi-process jobs on this machine: the training binary as 2 processes x 4 CPU devices
(jax.distributed on localhost, gloo collectives), started by flava_jax.launch as a pod slice's
hosts are started, against the same job as 1 process x 8 devices.

The 1-process job also runs through the launcher, so that its collectives are gloo's too: the
two jobs then sum gradients in the same order and agree to the bit. (A 1-process run with XLA's
in-process collectives sums in another order: its losses differ from these by ~1e-6 and its
parameters after 12 Adam steps by ~2e-4.)
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from flava_jax import evaluate, experiment, trainer, warm_start
from flava_jax.data import checkpointing, embedded, pipeline
from tests.multihost import config as job_config
from tests.processes import REPO, child_env
from tests.trees import assert_trees_equal

CONFIG = os.path.join(REPO, "tests", "multihost", "config.py")
STEPS = 12
EVERY = 4


def _env():
  return child_env()


def _launch(processes, args, heartbeat=0, cpu_devices=0):
  """flava_jax.launch running `args` (a module and its flags) as `processes` x 8/processes CPU
  devices (or x cpu_devices); its output (process 0's, then the others' prefixed lines) on one
  pipe."""
  command = [sys.executable, "-m", "flava_jax.launch", f"--processes={processes}",
             f"--cpu_devices={cpu_devices or 8 // processes}", "--grace_seconds=120"]
  if heartbeat:
    command.append(f"--heartbeat_seconds={heartbeat}")
  command += ["--", sys.executable, "-m", *args]
  return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train(processes, workdir, *flags, heartbeat=0):
  return _launch(processes, ["flava_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
                             *flags], heartbeat)


def _finish(proc):
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  return out


def _finish_all(procs):
  """_finish of each job, all running at once; each job's output read as it comes (a full pipe
  would stall its job)."""
  done = [None] * len(procs)

  def communicate(i):
    done[i] = procs[i].communicate(timeout=900)[0]

  threads = [threading.Thread(target=communicate, args=(i,)) for i in range(len(procs))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for proc, out in zip(procs, done):
    assert out is not None and proc.returncode == 0, (out or "")[-4000:]
  return done


def _read_until(proc, text):
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if text in line:
      return "".join(lines)
  raise AssertionError(f"the job ended without printing {text!r}:\n{''.join(lines[-40:])}")


def _pids(out):
  return {int(i): int(pid) for i, pid in re.findall(r"launch: process (\d+) of \d+ is pid (\d+)",
                                                    out)}


def _losses(workdir):
  """[(step, corpus, loss)] of metrics.jsonl's progress rows."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      rows += [(row["step"], k.split("/")[0], v) for k, v in row.items()
               if k.endswith("/loss")]
  return rows


def _data_states(workdir, step):
  return checkpointing.saved_states(
      checkpointing.epath.Path(workdir) / "checkpoints" / str(step) / "data")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  """The 12-step job's workdir as 1 x 8 and as 2 x 4, and the 2 x 4 job's output. The two jobs
  are independent (their own workdirs and coordinator ports) and run at the same time: one job's
  compiles and collective waits leave a core idle that the other uses."""
  embedded.ensure()  # the session's embedded corpus, built here once (not by three processes)
  one = str(tmp_path_factory.mktemp("one_process"))
  two = str(tmp_path_factory.mktemp("two_processes"))
  _, out = _finish_all([_train(1, one), _train(2, two)])
  return dict(one=one, two=two, out=out)


def test_two_processes_train_as_one(jobs):
  """Every step's loss, the corpus order and the final parameters are the 1-process job's, to
  the bit; only process 0 writes metrics, TensorBoard files and progress lines; each process
  saved its own data state and together they are where the 1-process job's is."""
  one, two = _losses(jobs["one"]), _losses(jobs["two"])
  assert [s for s, _, _ in one] == list(range(1, STEPS + 1))  # one row per step: one writer
  assert one == two
  assert_trees_equal(warm_start.read_workdir_params(jobs["two"], "two"),
                     warm_start.read_workdir_params(jobs["one"], "one"))
  assert len(os.listdir(os.path.join(jobs["two"], "tensorboard"))) == 1
  others = [l for l in jobs["out"].splitlines() if l.startswith("[process 1]")]
  assert others and not any(re.search(r"step \d+/", l) for l in others)  # no progress lines
  assert "in 2 processes" in jobs["out"]
  states = _data_states(jobs["two"], STEPS)
  assert [s["process_count"] for s in states] == [2, 2]
  (single,) = _data_states(jobs["one"], STEPS)
  assert pipeline.carry_over_state(states, 0, 1, 16)["grain"] == single["grain"]


def test_preemption_a_lost_process_and_a_damaged_checkpoint(jobs, tmp_path):
  """One 2-process job through three starts, ending bit-identical to the uninterrupted job:

  1. SIGTERM to process 1 alone, then to the whole job (the launcher passes it on): both
     processes save the same step and exit 0.
  2. Started again, it resumes from that step, its losses the uninterrupted job's; once
     checkpoint 8 is saved, process 1 is killed: process 0 stops by itself naming the lost
     process, and the launcher fails.
  3. One file of checkpoint 8 truncated, one that only process 1 reads (its data state): both
     processes set the checkpoint aside and resume from the SIGTERM's step.
  """
  workdir = str(tmp_path / "run")
  proc = _train(2, workdir)
  out = _read_until(proc, f"checkpoint {EVERY} saving")
  os.kill(_pids(out)[1], signal.SIGTERM)
  proc.send_signal(signal.SIGTERM)
  out += _finish(proc)
  # Not anchored at line starts: process 0 writes to the terminal itself and the launcher relays
  # process 1's lines, so one process's line may land inside the other's.
  stops = re.findall(r"(\[process 1\] )?SIGTERM: saved step (\d+) and stopped", out)
  assert len(stops) == 2 and stops[0][1] == stops[1][1], out[-3000:]
  stopped = int(stops[0][1])
  assert EVERY < stopped < 2 * EVERY, out[-3000:]  # the vote is read one step late
  assert [s["process_count"] for s in _data_states(workdir, stopped)] == [2, 2]

  proc = _train(2, workdir, heartbeat=5)
  out = _read_until(proc, f"checkpoint {2 * EVERY} saving")
  assert f"resumed from step {stopped}" in out
  os.kill(_pids(out)[1], signal.SIGKILL)
  out += proc.communicate(timeout=600)[0]
  assert proc.returncode != 0
  assert "launch: process 1 was killed by SIGKILL" in out
  # Process 0 names the lost process: in its own words when a collective failed first, or in
  # JAX's when the coordination service noticed first.
  assert ("process(es) 1 left the job" in out
          or re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\b", out)), out[-3000:]
  assert "still running after" not in out  # process 0 stopped by itself, not by the launcher
  # The restart after the SIGTERM was exact: its steps are the uninterrupted job's.
  assert _losses(workdir)[:2 * EVERY] == _losses(jobs["two"])[:2 * EVERY]

  damaged = os.path.join(workdir, "checkpoints", str(2 * EVERY), "data", "process_1-of-2.json")
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)
  out = _finish(_train(2, workdir))
  assert f"warning: checkpoint {2 * EVERY} cannot be read" in out
  assert f"resumed from step {stopped}" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{2 * EVERY}.unreadable"))
  assert_trees_equal(warm_start.read_workdir_params(workdir, "run"),
                     warm_start.read_workdir_params(jobs["two"], "two"))
  assert _losses(workdir)[-(STEPS - stopped):] == _losses(jobs["two"])[stopped:]


def _restore(workdir, config, devices):
  """The newest checkpoint of `workdir` restored onto `config`'s mesh over `devices`."""
  exp = experiment.Experiment(config, devices)
  data = exp.pipeline()
  manager = trainer._manager(workdir, exp.run.checkpoint)  # pylint: disable=protected-access
  try:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            exp.create_state())
    state, step = trainer._restore_latest(manager, abstract, data, [])  # pylint: disable=protected-access
    return state, step, data.get_state()
  finally:
    manager.close()
    data.close()


@pytest.mark.parametrize("processes,mesh", [(8, dict(data=8, fsdp=1, tensor=1)),
                                            (8, dict(data=2, fsdp=2, tensor=2)),
                                            (4, dict(data=1, fsdp=2, tensor=2))],
                         ids=["1x8", "1x8_data2_fsdp2_tensor2", "1x4_fsdp2_tensor2"])
def test_a_two_process_checkpoint_resumes_in_one_process_on_another_mesh(jobs, processes,
                                                                          mesh, tmp_path):
  """Written by 2 processes x 4 devices (data=8); restored by this one process on 8 or 4
  devices and another mesh: the same parameters, the data where the 1-process job's is; and
  training goes on from there."""
  config = job_config.get_config()
  config.sharding.mesh = mesh
  devices = jax.devices()[:processes]
  state, step, data_state = _restore(jobs["two"], config, devices)
  assert step == STEPS
  assert dict(jax.tree.leaves(state.params)[0].sharding.mesh.shape) == mesh
  assert_trees_equal(jax.tree.map(np.asarray, state.params),
                     warm_start.read_workdir_params(jobs["two"], "two"))
  (single,) = _data_states(jobs["one"], STEPS)
  assert data_state["grain"] == single["grain"]
  if processes == 4:  # the binary, as 1 process x 4 devices on that mesh, trains on
    workdir = str(tmp_path / "run")
    shutil.copytree(jobs["two"], workdir)
    out = _finish(_launch(1, ["flava_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
                              f"--config.total_steps={STEPS + 2}",
                              *[f"--config.sharding.mesh.{k}={v}" for k, v in mesh.items()]],
                          cpu_devices=4))
    assert f"resumed from step {STEPS}" in out and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out
    assert [s for s, _, _ in _losses(workdir)][-2:] == [STEPS + 1, STEPS + 2]
    assert all(np.isfinite(l) for _, _, l in _losses(workdir))


def _evaluate(processes, config, checkpoint, output, *flags):
  return _evaluate_together([processes], config, checkpoint, [output], *flags)[0]


def _evaluate_together(process_counts, config, checkpoint, outputs, *flags):
  """The evaluate binary as one job per process count, all started at once; each job's
  metrics."""
  procs = [_launch(processes, ["flava_jax.evaluate", f"--config={config}",
                               f"--checkpoint={checkpoint}", f"--output={output}", *flags])
           for processes, output in zip(process_counts, outputs)]
  _finish_all(procs)
  metrics = []
  for output in outputs:
    with open(output, encoding="utf-8") as f:
      metrics.append(json.load(f)["metrics"])
  return metrics


@pytest.mark.parametrize("evaluator", ["retrieval", "zero_shot", "finetune"])
def test_evaluation_in_two_processes_equals_one(jobs, evaluator, tmp_path):
  """The evaluate binary on the 2-process job's checkpoint, as 2 processes x 4 devices, gives
  the figures of one process: retrieval and zero-shot those this process computes on 8 devices;
  fine-tuning (20 steps on sentence pairs, its batches the same for any number of processes)
  those of a 1 x 8 job (gloo's sums, as above)."""
  path = os.path.join(REPO, "configs", "eval", f"{evaluator}.py")
  if evaluator == "finetune":
    flags = ["--config.task.steps=20"]
    config = f"{path}:text_pairs"
    # The two jobs are independent: run at the same time.
    two, one = _evaluate_together([2, 1], config, jobs["two"],
                                  [str(tmp_path / "two.json"), str(tmp_path / "one.json")],
                                  *flags)
    assert one == two and two["steps"] == 20
    return
  two = _evaluate(2, path, jobs["two"], str(tmp_path / "two.json"))
  one = evaluate.run(_load(path), jobs["two"])
  assert set(two) == set(one) and two, (two, one)
  for name, value in one.items():
    assert two[name] == pytest.approx(value, abs=1e-6), name


def _load(path):
  spec = importlib.util.spec_from_file_location("eval_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_each_process_writes_its_own_part_of_a_checkpoint(jobs):
  """One data state per process, and one Orbax array store per process (each wrote its own
  shards)."""
  step = os.path.join(jobs["two"], "checkpoints", str(STEPS))
  names = sorted(os.listdir(os.path.join(step, "data")))
  assert [n for n in names if n.endswith(".json")] == ["process_0-of-2.json",
                                                       "process_1-of-2.json"]
  stores = sorted(n for n in os.listdir(os.path.join(step, "state")) if n.startswith("ocdbt."))
  assert stores == ["ocdbt.process_0", "ocdbt.process_1"]
