"""What every flava_jax binary (main, evaluate) does before its work.

Refuses stray arguments, keeps library INFO chatter (orbax) quiet unless `-v` asks for it, keeps
an installed libtpu from starting on a machine without a TPU (skip_absent_tpu), joins the other
processes of a multi-process job (flava_jax.multihost: started by flava_jax.launch, or
--multiprocess on a TPU slice or under SLURM), and logs the topology. In a multi-process job a
process that fails leaves at once (`exit`, and an uncaught exception): waiting in JAX's shutdown
barrier for processes that wait in a collective for it would hang the job.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence

import jax
from absl import app, flags, logging

from flava_jax import multihost

# Device files of an attached TPU: /dev/accel0.. (v2-v4), /dev/vfio/0.. (v5e, v5p, v6e; VFIO
# groups are numbered, /dev/vfio/vfio alone is the kernel's control file on any machine).
TPU_DEVICE_PATTERNS = ("/dev/accel*", "/dev/vfio/[0-9]*")
# A GPU's device files: left to JAX (its CUDA/ROCm plugins decide what to use).
GPU_DEVICE_PATTERNS = ("/dev/nvidia[0-9]*", "/dev/kfd")
GOOGLE_PCI_VENDOR = "0x1ae0"  # Google's PCI devices: TPU chips (and gVNIC network cards)


def tpu_present() -> bool:
  """Whether this machine has a TPU attached: its device files, or TPU chips on the PCI bus."""
  if any(glob.glob(p) for p in TPU_DEVICE_PATTERNS):
    return True
  try:  # JAX's own test: Google PCI devices with a TPU chip's device id
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except  (a private module: any Google PCI device)
    pass
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def machine() -> dict[str, bool]:
  """What platforms_without_tpu asks of this machine: tpu, gpu and libtpu (installed)."""
  return dict(tpu=tpu_present(), gpu=any(glob.glob(p) for p in GPU_DEVICE_PATTERNS),
              libtpu=(importlib.util.find_spec("libtpu") is not None
                      or bool(os.environ.get("TPU_LIBRARY_PATH"))))


def platforms_without_tpu(environ: Mapping[str, str], tpu: bool, gpu: bool,
                          libtpu: bool) -> str | None:
  """The JAX platforms to pin at start-up ("cpu"), or None to leave JAX's choice alone.

  The rule: pin "cpu" only when nobody chose the platforms (JAX_PLATFORMS unset) and the machine
  has nothing but its CPU to offer: libtpu is installed (else there is nothing to keep quiet), no
  TPU device is attached, and no GPU either (JAX's GPU plugins keep choosing for themselves).
  Without a TPU, an installed libtpu still starts when JAX looks for backends, fails, and prints
  E0000 ... INVALID_ARGUMENT lines about TPU_WORKER_HOSTNAMES before JAX falls back to the CPU.
  On a TPU VM (device files present) or with JAX_PLATFORMS set (the tests: cpu; a user's tpu),
  nothing changes. The AOT tool (flava_jax/tools/aot.py) is unaffected: it loads libtpu itself
  for jax.experimental.topologies.get_topology_desc(platform="tpu"), whatever the platforms.
  """
  if "JAX_PLATFORMS" in environ or not libtpu or tpu or gpu:
    return None
  return "cpu"


def skip_absent_tpu() -> str | None:
  """Applies platforms_without_tpu to this machine and process; returns what it pinned.

  Must run before JAX initialises its backends (the first jax.devices(), process_index(), ...).
  """
  if jax.config.jax_platforms:  # set in code (jax.config.update) or by JAX_PLATFORMS
    return None
  platforms = platforms_without_tpu(os.environ, **machine())
  if platforms:
    jax.config.update("jax_platforms", platforms)
  return platforms


def start(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  skip_absent_tpu()  # before anything below asks JAX for devices
  multiprocess = "multiprocess" in flags.FLAGS and flags.FLAGS.multiprocess
  if multihost.initialize(multiprocess) and jax.process_count() > 1:
    sys.excepthook = _leave_on_exception
  logging.warning("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count(),
                  jax.devices()[0].platform)


def exit(code: int) -> None:  # pylint: disable=redefined-builtin
  """sys.exit(code); a failing process of a multi-process job leaves without JAX's shutdown
  barrier (the others notice it is gone and stop, naming it)."""
  if code and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _leave_on_exception(kind, value, tb) -> None:
  traceback.print_exception(kind, value, tb)
  me = f"process {jax.process_index()} of {jax.process_count()}"
  if isinstance(value, jax.errors.JaxRuntimeError):
    # Most likely a collective whose peer has died: name it once the coordination service
    # knows (at most the heartbeat timeout; JAX may also end this process first, naming it).
    print(f"{me}: a computation with the other processes failed; asking which process left "
          f"the job (up to {multihost.heartbeat_seconds()} s)", file=sys.stderr, flush=True)
    lost = _with_timeout(multihost.lost_processes, multihost.heartbeat_seconds() + 10)
    if lost:
      print(f"error: {me} stops: process(es) {', '.join(map(str, lost))} left the job "
            "(killed or crashed: see its output)", file=sys.stderr)
      exit(1)
  print(f"error: {me} failed ({kind.__name__}); leaving the job", file=sys.stderr)
  exit(1)


def _with_timeout(fn, seconds: float):
  """fn() in a daemon thread; None when it has not returned within `seconds`."""
  out = []
  thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
  thread.start()
  thread.join(seconds)
  return out[0] if out else None
