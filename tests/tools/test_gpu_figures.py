"""launch/gpu_figures.sh's bookkeeping, without running a stage: a stage the budget cannot hold is
skipped and said so in the log, an unknown stage is refused. (The stages themselves run the bench,
bench_data and the binary, tested on their own; `TINY=1` runs them all by hand.)"""

import subprocess
import sys

from tests.processes import REPO, child_env


def _script(out, *stages):
  env = dict(child_env(), TINY="1", BUDGET_S="0", PYTHON=sys.executable)
  return subprocess.run(["bash", "launch/gpu_figures.sh", str(out), *stages], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_stages_past_the_budget_are_skipped_and_unknown_ones_refused(tmp_path):
  proc = _script(tmp_path, "paired", "loop", "nonsense")
  assert proc.returncode == 2, proc.stderr[-2000:]
  log = (tmp_path / "log.txt").read_text()
  assert "stages paired loop nonsense" in log
  for stage in ("paired", "corpus", "loop"):
    assert f"== {stage}: skipped, " in log
  assert "unknown stage nonsense" in log and not (tmp_path / "paired.json").exists()
