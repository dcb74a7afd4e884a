"""The launch scripts parse, and refuse to run without their arguments."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) +
                 glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))


def test_there_are_launch_scripts_for_local_tpu_and_slurm():
  names = {os.path.basename(p) for p in SCRIPTS}
  assert {"local.sh", "tpu_vm.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
  subprocess.run(["bash", "-n", script], check=True)


def test_tpu_script_names_its_missing_argument():
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh")], capture_output=True,
                       text=True)
  assert out.returncode != 0 and "create|setup|run|delete" in out.stderr
