"""The XLA flags of this test session and the environment of a binary a test starts in a child
process: this session's (its compilation cache and embedded corpus, conftest.py), float32
matmuls at full precision, unbuffered output (a test reads it line by line)."""

import os

from flava_jax import run_once

DEVICES = 8  # the session's fake CPU devices
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root


def xla_flags(devices: int = DEVICES, optimised: bool = False) -> str:
  """XLA_FLAGS for `devices` fake CPU devices, compiling without LLVM's optimisation (the tests
  compile far more than they run; run_once.CPU_OPTIONS) unless `optimised`."""
  options = run_once.OPTIMISED_CPU_OPTIONS if optimised else run_once.CPU_OPTIONS
  return f"--xla_force_host_platform_device_count={devices} {run_once.xla_flags(options)}"


def child_env(devices: int | None = None, optimised: bool = False) -> dict[str, str]:
  """This process's environment for a child; with `devices` or `optimised`, the child's own
  XLA_FLAGS (xla_flags) instead of this session's."""
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
  if devices is not None or optimised:
    env["XLA_FLAGS"] = xla_flags(devices or DEVICES, optimised)
  return env
