"""The layering is a contract (pyproject.toml, import-linter): data and models never import each
other, and the trainer, pipeline, evaluators and tools never import a model family's task or
losses. Checked here so that the README's test command (CI's) enforces it."""

import subprocess
import sys

from tests.processes import REPO


def test_import_contracts_are_kept():
  done = subprocess.run(
      [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
       "sys.exit(lint_imports_command())"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "3 kept, 0 broken" in done.stdout, done.stdout[-2000:]
