"""`python -m flava_jax.evaluate` on each kind of checkpoint: a training workdir, a flava_jax
model directory and a transformers directory; bad configs fail naming the field."""

import json
import subprocess
import sys

import pytest

from configs.eval import zero_shot as zero_shot_config
from flava_jax import checkpoint, evaluate
from flava_jax.data import embedded
from tests.processes import REPO, child_env


def _run(*args):
  return subprocess.run([sys.executable, "-m", "flava_jax.evaluate", *args], cwd=REPO,
                        env=child_env(),
                        capture_output=True, text=True, check=False, timeout=900)


def test_binary_on_a_training_workdir(trained_workdir, tmp_path):
  out = tmp_path / "metrics.json"
  done = _run("--config=configs/eval/zero_shot.py", f"--checkpoint={trained_workdir}",
              f"--output={out}")
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "zero_shot: top1" in done.stdout
  metrics = json.loads(out.read_text())["metrics"]
  assert metrics["images"] == 320 and metrics["top1"] > 2.5 / 32


def test_binary_refuses_bad_configs_naming_the_field(trained_workdir):
  done = _run("--config=configs/eval/zero_shot.py", f"--checkpoint={trained_workdir}",
              "--config.task.templates=('a photo',)")
  assert done.returncode != 0 and "task.templates" in done.stderr, done.stderr[-2000:]
  done = _run("--config=configs/eval/retrieval.py", f"--checkpoint={trained_workdir}",
              "--config.task.data.name=nonexistent")
  assert done.returncode != 0 and "task.data.name='nonexistent'" in done.stderr, done.stderr[-2000:]
  done = _run("--config=configs/eval/zero_shot.py", "--checkpoint=/nonexistent")
  assert done.returncode != 0 and "--checkpoint='/nonexistent'" in done.stderr


def _small_vocab(path, size):
  """The embedded vocabulary's first `size` entries (the rest reads as [UNK])."""
  with open(embedded.vocab_file()) as f:
    words = f.read().split("\n")[:size]
  with open(path, "w") as f:
    f.write("\n".join(words) + "\n")


def test_transformers_and_converted_model_directories(tiny_hf_dir, tmp_path):
  config = zero_shot_config.get_config()
  config.task.limit = 48
  config.text_length = 16  # the tiny transformers model has 40 positions
  # No vocab.txt beside a 100-token model: refused, naming the field to set.
  with pytest.raises(ValueError, match="vocab_file"):
    evaluate.run(config, tiny_hf_dir)
  _small_vocab(tmp_path / "vocab.txt", 100)
  config.vocab_file = str(tmp_path / "vocab.txt")
  from_transformers = evaluate.run(config, tiny_hf_dir)
  assert from_transformers["images"] == 48 and 0 <= from_transformers["top1"] <= 1
  # The same weights as a flava_jax model directory give the same figures.
  loaded = evaluate.load_checkpoint(tiny_hf_dir)
  model_dir = str(tmp_path / "model")
  checkpoint.save_model(model_dir, loaded.predict.model.config, loaded.params)
  assert evaluate.load_checkpoint(model_dir).kind == "model"
  from_model_dir = evaluate.run(config, model_dir)
  assert from_model_dir == pytest.approx(from_transformers)
