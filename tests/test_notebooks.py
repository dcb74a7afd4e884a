"""The notebooks run top to bottom on the tiny configs (a few training steps) and draw figures.

Each notebook is executed in memory by a fresh python3 kernel, which inherits this process's
environment (the session's embedded-corpus cache, conftest.py) with the notebooks' parameters set
small and one CPU device (`kernel_env`). The stored notebooks must carry no outputs.
"""

import asyncio
import os
import re

import nbclient
import nbformat
import pytest

from flava_jax import run_once

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
# Notebook -> the least number of figures (PNG outputs) it draws.
FIGURES = {"quickstart.ipynb": 3, "dvae_and_masking.ipynb": 4, "data_mixture.ipynb": 3,
           "blip.ipynb": 3, "omni.ipynb": 4}
SMALL = {
    "FLAVA_NB_STEPS": "30",  # quickstart and data_mixture train the same program: one compile
    "FLAVA_NB_DVAE_STEPS": "20",
    "FLAVA_NB_DVAE_BATCH": "32",
    "FLAVA_NB_BATCHES": "40",
    "FLAVA_NB_ZERO_SHOT_IMAGES": "64",
    "FLAVA_CHECKPOINT": "",  # train, whatever the caller's environment names
    "FLAVA_DVAE": "",
    "BLIP_NB_STEPS": "10",
    "BLIP_NB_RETRIEVAL_IMAGES": "10",
    "BLIP_CHECKPOINT": "",
    "OMNI_NB_STEPS": "2",
    "OMNI_NB_RECORDS": "8",
    "OMNI_CHECKPOINT": "",
    "OMNI_DVAE": "",
    "JAX_PLATFORMS": "cpu",
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment of the kernels: small parameters; one CPU device, as on a Colab CPU runtime
  (conftest.py's 8 fake devices cost about a fifth more here); a cheaper CPU backend compile (no
  LLVM optimisation: the notebooks compile far more than they run, and this takes another fifth
  off); one XLA compilation cache for the module (the FLAVA train steps quickstart compiles are
  read back by data_mixture)."""
  return dict(SMALL, XLA_FLAGS=run_once.xla_flags(run_once.CPU_OPTIONS),
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("notebook_xla")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _outputs(notebook):
  return [output for cell in notebook.cells if cell.cell_type == "code"
          for output in cell.get("outputs", [])]


def _text(notebook) -> str:
  return "".join(output.get("text", "") for output in _outputs(notebook)
                 if output.output_type == "stream")


@pytest.mark.parametrize("name", list(FIGURES))
def test_stored_notebook_is_clean(name):
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert not _outputs(notebook) and all(cell.execution_count is None for cell in code), (
      f"{name} was saved with outputs: clear them before committing")
  # The first cell installs the package on Colab and makes the checkout importable elsewhere.
  assert "google.colab" in code[0].source and "REPO_URL" in code[0].source
  assert notebook.cells[0].cell_type == "markdown"


# The notebooks run in two lanes at the same time (a kernel compiles on one core), of about equal
# length (alone on this machine, 2026-12-04: omni 99 s, blip 45 s, quickstart 45 s, dvae_and_masking
# 31 s, data_mixture about 20 s): omni then dvae_and_masking; quickstart, then data_mixture (which
# reads back the FLAVA train steps quickstart compiled), then blip.
LANES = (("omni.ipynb", "dvae_and_masking.ipynb"),
         ("quickstart.ipynb", "data_mixture.ipynb", "blip.ipynb"))


@pytest.fixture(scope="module")
def executed(kernel_env, tmp_path_factory):
  """Each notebook executed top to bottom by its own kernel: (the notebook with its outputs, the
  error that stopped it or None)."""

  async def run(name):
    env = dict(os.environ, **kernel_env,
               TMPDIR=str(tmp_path_factory.mktemp(name.split(".")[0])))  # the workdirs
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    try:
      await client.async_execute(env=env)
    except Exception as e:  # pylint: disable=broad-except  (re-raised by the notebook's test)
      return notebook, e
    return notebook, None

  async def lane(names):
    return {name: await run(name) for name in names}

  async def run_all():
    assert sorted(sum(LANES, ())) == sorted(FIGURES)  # every notebook in one lane
    done = await asyncio.gather(*map(lane, LANES))
    return {name: result for results in done for name, result in results.items()}

  return asyncio.run(run_all())


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_runs(name, executed):
  notebook, error = executed[name]
  if error is not None:
    raise error  # CellExecutionError, with the cell and traceback, if a cell failed

  outputs = _outputs(notebook)
  assert not [o for o in outputs if o.output_type == "error"]
  figures = sum("image/png" in o.get("data", {}) for o in outputs)
  assert figures >= FIGURES[name], f"{name} drew {figures} figures"
  text = _text(notebook)
  if name == "quickstart.ipynb":
    accuracy = re.search(r"over (\d+) held-out images: top-1 accuracy ([\d.]+) \(chance ([\d.]+)\)",
                         text)
    assert accuracy, text[-2000:]
    assert int(accuracy.group(1)) == 64 and float(accuracy.group(3)) == pytest.approx(1 / 32,
                                                                                        abs=1e-3)
    assert 0.0 <= float(accuracy.group(2)) <= 1.0
    assert re.search(r"image -> caption: \d of 8 right", text)
  elif name == "dvae_and_masking.ipynb":
    assert "20/20" in text  # the dVAE trained for its 20 steps
    full = re.search(r"full: 14x14 grid, target 75 patches.*mean ([\d.]+) masked.*max (\d+)\)",
                     text)
    assert full and 70 <= float(full.group(1)) <= 75 and int(full.group(2)) <= 75
    assert "image targets:" in text
  elif name == "blip.ipynb":
    share = re.search(r"found in their own scene's caption: ([\d.]+)", text)
    assert share and 0.0 <= float(share.group(1)) <= 1.0, text[-2000:]
    decisions = re.findall(r"^(web|synthetic) +(\w*) +match ([\d.]+) (kept|dropped)", text, re.M)
    assert len(decisions) == 6 and {d[0] for d in decisions} == {"web", "synthetic"}
    assert all((float(m) >= 0.5) == (k == "kept") for _, _, m, k in decisions)
    assert "'rerank_t2i_r1'" in text
  elif name == "omni.ipynb":
    assert "dVAE random (seed 0)" in text, text[-2000:]
    assert re.search(r"record #0 says '.+': [\d.]+ s at 16000 Hz; the model reads 5.00 s", text)
    assert "retrieval among 8 held-out records (chance R@1 0.125" in text
    recalls = re.findall(r"^  [a-z +>-]+ R@1 ([\d.]+)  R@5 ([\d.]+)  R@10 ([\d.]+)$", text, re.M)
    assert len(recalls) == 7 and all(0.0 <= float(r) <= 1.0 for row in recalls for r in row)
    ranks = re.findall(r"^caption #\d .* from the (text|text \+ recording): its image ranked "
                       r"(\d) of 8$", text, re.M)
    assert len(ranks) == 6 and all(1 <= int(r) <= 8 for _, r in ranks)
    wer = re.search(r"speech to text over 8 held-out recordings: WER from the recording ([\d.]+), "
                    r"from the recording and its image ([\d.]+) \(writing nothing 1.000", text)
    assert wer and float(wer.group(1)) >= 0.0 and float(wer.group(2)) >= 0.0
    assert len(re.findall(r"^#\d said: +'.+'$", text, re.M)) == 4
    assert len(re.findall(r"^   (written from the recording|with the image): +['\"].*['\"]$",
                          text, re.M)) == 8  # a repr: double quotes around a written "'"
    drawn = re.search(r"text to image over 8 held-out captions: code accuracy from the text "
                      r"([\d.]+), with the recording ([\d.]+)", text)
    assert drawn and all(0.0 <= float(drawn.group(g)) <= 1.0 for g in (1, 2))
    assert "dVAE round trip" in text
  else:
    shares = dict(re.findall(r"^(\w+): (\d+) of 40 batches", text, re.M))
    assert set(shares) == {"paired", "image", "text"} and sum(map(int, shares.values())) == 40
    assert int(shares["paired"]) > int(shares["image"])
    assert "the run's first 30 steps drew the corpora of section 1's first 30 batches: True" in text
