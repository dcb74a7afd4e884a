"""flava_jax.launch on small Python commands (no JAX): each process's environment, output, the
signals passed on, and a job that fails as a whole when one process fails."""

import signal
import subprocess
import sys
import textwrap

import pytest

from flava_jax import launch, multihost
from tests.processes import REPO


def test_each_process_learns_its_place_in_the_job():
  env = launch.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1",
                            "HOME": "/h"}, 1, 2, 4242, cpu_devices=4, heartbeat_seconds=9)
  assert env[multihost.COORDINATOR_ENV] == "localhost:4242"
  assert (env[multihost.NUM_PROCESSES_ENV], env[multihost.PROCESS_ID_ENV]) == ("2", "1")
  assert env[multihost.HEARTBEAT_ENV] == "9"
  assert (env["JAX_PLATFORMS"], env["JAX_NUM_CPU_DEVICES"],
          env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"]) == ("cpu", "4", "gloo")
  assert env["XLA_FLAGS"] == "--xla_foo=1" and env["HOME"] == "/h"
  plain = launch.process_env({}, 0, 3, 1)
  assert "JAX_PLATFORMS" not in plain and multihost.HEARTBEAT_ENV not in plain


def test_a_process_without_its_id_is_refused_at_start():
  with pytest.raises(ValueError, match="FLAVA_JAX_PROCESS_ID, JAX_COORDINATOR_ADDRESS is not"):
    multihost.initialize(False, {multihost.NUM_PROCESSES_ENV: "2"})
  assert multihost.initialize(False, {}) == ""  # one process: nothing to join


def _python(code):
  return [sys.executable, "-c", textwrap.dedent(code)]


def _job(code, processes=3, **kwargs):
  return subprocess.run([sys.executable, "-m", "flava_jax.launch", f"--processes={processes}",
                         *[f"--{k}={v}" for k, v in kwargs.items()], "--", *_python(code)],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_every_process_runs_and_the_others_output_is_prefixed(tmp_path):
  done = _job("""
      import os
      print("hello from", os.environ["FLAVA_JAX_PROCESS_ID"], "of",
            os.environ["FLAVA_JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"])
  """)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("hello from 0 of 3 localhost:")
  for i in (1, 2):
    assert f"[process {i}] hello from {i} of 3 localhost:" in done.stderr
  logged = _job("print('to the log')", processes=2, log_dir=str(tmp_path))
  assert logged.returncode == 0 and "to the log" not in logged.stdout + logged.stderr
  for i in range(2):
    assert (tmp_path / f"process_{i}.log").read_text() == "to the log\n"


def test_one_failing_process_fails_the_job_and_the_others_are_stopped():
  """Process 1 fails; process 0 would run for ever: the launcher names the failure, kills
  process 0 after the grace period and exits with process 1's status."""
  done = _job("""
      import os, sys, threading
      if os.environ["FLAVA_JAX_PROCESS_ID"] == "1":
          sys.exit(3)
      threading.Event().wait()
  """, processes=2, grace_seconds=1)
  assert done.returncode == 3
  assert "launch: process 1 exited with status 3" in done.stderr
  assert "launch: process 0 still running after 1s: killed" in done.stderr


def test_a_signal_to_the_launcher_reaches_every_process_once():
  """SIGTERM to the launcher, once its processes have their handlers: each handler runs once
  (a second SIGTERM would fail the process), and the job exits 0."""
  # The handler only writes to a pipe that the main thread reads: a handler that set a
  # threading.Event could deadlock when the signal lands while the main thread holds the
  # Event's lock inside wait() (CI saw one process hang so).
  code = """
      import os, signal
      readable, writable = os.pipe()
      got = []
      def handle(*args):
          if got:
              os._exit(9)
          got.append(1)
          os.write(writable, b"x")
      signal.signal(signal.SIGTERM, handle)
      print("ready", flush=True)
      os.read(readable, 1)
      print("stopped", flush=True)
  """
  proc = subprocess.Popen([sys.executable, "-m", "flava_jax.launch", "--processes=2", "--",
                           *_python(code)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  seen = []
  # Counted in the text, not by line: process 0 writes to the terminal itself and the launcher
  # relays process 1's lines, so with unbuffered output (PYTHONUNBUFFERED) one process's line
  # can land between the other's "ready" and its newline.
  while "".join(seen).count("ready") < 2:
    line = proc.stdout.readline()
    assert line, "".join(seen)
    seen.append(line)
  proc.send_signal(signal.SIGTERM)
  out = "".join(seen) + proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, out
  assert out.count("stopped") == 2 and "[process 1] stopped" in out


def test_put_same_places_what_every_process_holds_and_refuses_values_that_differ():
  """multihost.put_same in a 2 x 1-device job: each process gets its own shard of the values
  both hold; values that differ between the processes fail in both, naming process 1."""
  done = _job("""
      import jax, numpy as np
      from flava_jax import multihost
      multihost.initialize(False)
      mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
      split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      placed = multihost.put_same({"a": np.arange(6.0).reshape(2, 3), "b": np.int32(7)},
                                  {"a": split, "b": replicated})
      (a,), (b,) = placed["a"].addressable_shards, placed["b"].addressable_shards
      print("placed", jax.process_index(), a.data.tolist(), int(b.data), flush=True)
      try:
          multihost.put_same([np.full((2,), jax.process_index())], replicated)
      except ValueError as e:
          print("refused:", e, flush=True)
  """, processes=2, cpu_devices=1)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "placed 0 [[0.0, 1.0, 2.0]] 7" in done.stdout, done.stdout + done.stderr
  assert "[process 1] placed 1 [[3.0, 4.0, 5.0]] 7" in done.stderr
  refusal = "refused: process(es) [1] hold other values than process 0 for the same 1 arrays"
  assert refusal in done.stdout and f"[process 1] {refusal}" in done.stderr
