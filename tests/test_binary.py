"""The binaries' common start-up (flava_jax/binary.py): libtpu stays quiet where there is no TPU."""

import os
import subprocess
import sys

import pytest

from flava_jax import binary
from tests.processes import REPO

NOISE = ("INVALID_ARGUMENT", "libtpu", "TPU_WORKER_HOSTNAMES", "Failed to find host bounds",
         "InitGoogle", "common_lib.cc")


@pytest.mark.parametrize("environ, tpu, gpu, libtpu, expected", [
    ({}, False, False, True, "cpu"),  # libtpu installed, nothing but a CPU: keep libtpu out
    ({}, False, False, False, None),  # no libtpu: nothing to keep quiet
    ({}, True, False, True, None),  # a TPU VM: JAX's own choice (the TPU)
    ({}, False, True, True, None),  # a GPU machine: JAX's GPU plugin chooses
    ({"JAX_PLATFORMS": "cpu"}, False, False, True, None),  # the user (or the tests) chose
    ({"JAX_PLATFORMS": "tpu"}, False, False, True, None),
    ({"JAX_PLATFORMS": ""}, False, False, True, None),
])
def test_the_platform_rule(environ, tpu, gpu, libtpu, expected):
  assert binary.platforms_without_tpu(environ, tpu=tpu, gpu=gpu, libtpu=libtpu) == expected


@pytest.mark.skipif(binary.tpu_present(), reason="a TPU is attached: libtpu starts for real")
def test_a_binary_started_without_jax_platforms_prints_no_libtpu_errors():
  """What a user sees: JAX_PLATFORMS unset (the tests set it to cpu), libtpu installed (the test
  requirements), no TPU. The evaluate binary stops right after start-up on a missing checkpoint."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  done = subprocess.run([sys.executable, "-m", "flava_jax.evaluate",
                         "--config=configs/eval/zero_shot.py", "--checkpoint=/nonexistent"],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False,
                        timeout=120)
  output = done.stdout + done.stderr
  assert done.returncode != 0 and "--checkpoint='/nonexistent': no such directory" in output
  assert "process 0 of 1" in output  # start-up ran (and logged the topology) before stopping
  noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
  assert not noise, output[-3000:]


def test_the_aot_tool_still_gets_tpu_topologies_after_start_up_kept_libtpu_out():
  """flava_jax/tools/aot.py loads libtpu itself for abstract TPU devices on a CPU machine."""
  pytest.importorskip("libtpu")
  code = ("import os; from flava_jax import binary; pinned = binary.skip_absent_tpu(); "
          "from jax.experimental import topologies; "
          "os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8'); "
          "t = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1'); "
          "print('result', pinned, len(t.devices), t.devices[0].platform)")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  # This test process may hold libtpu already (tests/tools/test_aot.py), and with it libtpu's
  # one-process lock file.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, check=False, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"result {binary.platforms_without_tpu(env, **binary.machine())} 4 tpu" in done.stdout
