"""Runs N processes of any flava_jax binary on this machine, as one multi-process JAX job.

    python -m flava_jax.launch --processes=2 --cpu_devices=4 -- \
        python -m flava_jax.main --config=configs/flava.py:tiny --workdir=/tmp/flava_2x4

Each process gets the job's coordinator (process 0, on a free localhost port), its process id and
count (flava_jax.multihost reads them and calls jax.distributed.initialize), and with
--cpu_devices, K CPU devices that talk through gloo: a real multi-controller job, as on a TPU pod
slice, without one. The same binary flags run on a TPU VM slice (launch/tpu_vm.sh) and under
SLURM (launch/slurm.sbatch); only how the processes learn their place differs (docs/training.md).

Signals: SIGTERM, SIGINT and SIGHUP reach the launcher and are passed on once to every process
(each process has its own session, so a terminal's Ctrl-C is not delivered twice): the job
saves a checkpoint at one step in all processes and exits 0. Failure: when a process exits
non-zero or is killed, the launcher says which, gives the others --grace_seconds to stop by
themselves (JAX's coordination service ends them, naming the lost process), then kills what is
left, and exits with the first failure's status (128 + signal number for a signal).

Output: process 0 writes to this terminal; the others' lines are prefixed "[process I]" on
stderr. With --log_dir, process I writes DIR/process_I.log instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from flava_jax import multihost

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, count: int, port: int,
                cpu_devices: int = 0, heartbeat_seconds: int = 0) -> dict[str, str]:
  """The environment of process `index` of `count`."""
  env = dict(base)
  env.update({multihost.COORDINATOR_ENV: f"localhost:{port}",
              multihost.NUM_PROCESSES_ENV: str(count),
              multihost.PROCESS_ID_ENV: str(index),
              "PYTHONUNBUFFERED": "1"})
  if heartbeat_seconds:
    env[multihost.HEARTBEAT_ENV] = str(heartbeat_seconds)
  if cpu_devices:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    # XLA's older way to ask for CPU devices would contradict JAX_NUM_CPU_DEVICES
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla)
  return env


def _describe(status: int) -> str:
  if status < 0:
    return f"was killed by {signal.Signals(-status).name}"
  return f"exited with status {status}"


def _exit_code(status: int) -> int:
  return 128 - status if status < 0 else status


def _relay(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode("utf-8", "replace"))
    out.flush()
  stream.close()


class Job:
  """N processes of one command; `wait()` returns the job's exit status."""

  def __init__(self, command: Sequence[str], processes: int, cpu_devices: int = 0,
               port: int = 0, log_dir: str = "", grace_seconds: float = 30.0,
               heartbeat_seconds: int = 0, environ: Mapping[str, str] = os.environ):
    if processes < 1:
      raise ValueError(f"--processes={processes} must be at least 1")
    if not command:
      raise ValueError("no command to run (put it after --)")
    self.grace_seconds = grace_seconds
    self.procs: list[subprocess.Popen] = []
    self._threads: list[threading.Thread] = []
    self._logs = []
    port = port or free_port()
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
    for i in range(processes):
      env = process_env(environ, i, processes, port, cpu_devices, heartbeat_seconds)
      if log_dir:
        log = open(os.path.join(log_dir, f"process_{i}.log"), "wb")  # pylint: disable=consider-using-with
        self._logs.append(log)
        out = err = log
      elif i == 0:
        out = err = None  # this terminal
      else:
        out, err = subprocess.PIPE, subprocess.STDOUT
      proc = subprocess.Popen(list(command), env=env, stdout=out, stderr=err,  # pylint: disable=consider-using-with
                              start_new_session=True)
      self.procs.append(proc)
      print(f"launch: process {i} of {processes} is pid {proc.pid}", file=sys.stderr, flush=True)
      if out is subprocess.PIPE:
        thread = threading.Thread(target=_relay, args=(proc.stdout, f"[process {i}] ",
                                                       sys.stderr), daemon=True)
        thread.start()
        self._threads.append(thread)

  def signal(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          proc.send_signal(signum)
        except ProcessLookupError:
          pass

  def wait(self) -> int:
    """Waits for every process; the job's status (0, or the first failure's)."""
    failed = []
    while not failed and any(p.poll() is None for p in self.procs):
      failed = self._failed()
      if not failed:
        time.sleep(0.1)
    failed = failed or self._failed()
    if failed:
      running = [i for i, p in enumerate(self.procs) if p.poll() is None]
      said = "; ".join(f"process {i} {_describe(status)}" for i, status in failed)
      print(f"launch: {said}"
            + (f"; waiting up to {self.grace_seconds:g}s for process(es) "
               f"{', '.join(map(str, running))} to stop" if running else ""),
            file=sys.stderr, flush=True)
      deadline = time.monotonic() + self.grace_seconds
      for i in running:
        try:
          self.procs[i].wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          print(f"launch: process {i} still running after {self.grace_seconds:g}s: killed",
                file=sys.stderr, flush=True)
          self.procs[i].kill()
          self.procs[i].wait()
    for thread in self._threads:
      thread.join()
    for log in self._logs:
      log.close()
    return _exit_code(failed[0][1]) if failed else 0

  def _failed(self) -> list[tuple[int, int]]:
    """(index, status) of the processes that failed so far; killed by a signal first (the
    likely cause: the others' failures follow from it)."""
    failed = [(i, p.returncode) for i, p in enumerate(self.procs)
              if p.poll() is not None and p.returncode != 0]
    return sorted(failed, key=lambda f: (f[1] >= 0, f[0]))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(prog="python -m flava_jax.launch", description=(
      "Run N processes of a command as one multi-process JAX job on this machine."))
  parser.add_argument("--processes", type=int, default=2, help="number of processes")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="CPU devices per process (JAX_PLATFORMS=cpu, gloo collectives); "
                      "0: leave the platform to JAX")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--log_dir", default="", help="write process I's output to "
                      "LOG_DIR/process_I.log instead of this terminal")
  parser.add_argument("--grace_seconds", type=float, default=30.0,
                      help="after a process fails, how long the others get to stop by themselves")
  parser.add_argument("--heartbeat_seconds", type=int, default=0,
                      help="how soon a dead process is noticed by the others (0: JAX's 100 s)")
  args = parser.parse_args(own)
  jobs: list[Job] = []
  received: list[int] = []

  def forward(signum, frame):  # in place before any process starts
    del frame
    received.append(signum)
    for job in jobs:
      job.signal(signum)

  for signum in FORWARDED:
    signal.signal(signum, forward)
  try:
    jobs.append(Job(command, args.processes, args.cpu_devices, args.port, args.log_dir,
                    args.grace_seconds, args.heartbeat_seconds))
  except (ValueError, OSError) as e:
    parser.error(str(e))
  for signum in received:  # a signal while the processes were starting
    jobs[0].signal(signum)
  return jobs[0].wait()


if __name__ == "__main__":
  sys.exit(main())
