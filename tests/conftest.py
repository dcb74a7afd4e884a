"""Test set-up: 8 fake CPU devices, float32 matmuls, and tiny transformers reference models."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The ahead-of-time compiles for abstract TPUs load libtpu, which by default allows one process
# per machine (a lock file): the two workers may both compile for a TPU at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The embedded corpus is built once per test session (about 10 s), away from the user's cache;
# compiled programs are cached for the session: tests that build the same step (the trainer's
# resume test runs the same training three times) compile it once. Both are environment
# variables, set before pytest-xdist starts its workers: the workers and the binaries the tests
# start share them. A corpus build is atomic. A compilation cache entry is written in place, so
# the cache gets a size limit: with one, JAX reads and writes entries under a file lock, and no
# process reads an entry another is still writing (`filelock` comes with transformers).
_MADE = []  # the folders made here (by the first process, before any worker): removed at the end
for _name, _prefix in (("FLAVA_JAX_CACHE", "flava_jax_test_cache."),
                       ("JAX_COMPILATION_CACHE_DIR", "flava_jax_test_xla.")):
  if _name not in os.environ:
    os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
    _MADE.append(os.environ[_name])
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from tests.processes import xla_flags  # noqa: E402

# 8 fake CPU devices, and a CPU backend that compiles cheaply (no LLVM optimisation, XLA's loop
# emitters; flava_jax/run_once.py): the tests compile far more than they run (most run a step or
# a few), and every test and the binaries they start (which inherit XLA_FLAGS) compile faster.
# Figures are within float32 rounding of an optimised build's; bit-exact checks compare runs made
# under the same flags. XLA reads the flags when the first device is asked for, after this.
os.environ.setdefault("XLA_FLAGS", xla_flags())

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

TINY_HF = dict(
    image_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, image_size=32, patch_size=8, vocab_size=64),
    text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=40),
    multimodal_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
    image_codebook_config=dict(hidden_size=8, vocab_size=64, num_blocks_per_group=1),
    hidden_size=32, projection_dim=24)


def randomize_(model, seed: int = 0):
  from flava_jax.tools.parity import randomize_weights_  # pylint: disable=import-outside-toplevel
  return randomize_weights_(model, seed)


@pytest.fixture(scope="session")
def tiny_hf_pretraining():
  """A randomly initialised tiny transformers FlavaForPreTraining (with image codebook)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import FlavaConfig, FlavaForPreTraining  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = FlavaForPreTraining(FlavaConfig(**TINY_HF)).eval()
  return randomize_(model)


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_pretraining, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_flava")
  tiny_hf_pretraining.save_pretrained(path)
  return str(path)


# --- the evaluator tests (tests/evals): a tiny FLAVA trained once per session ---------------


@pytest.fixture(scope="session")
def trained_workdir():
  """A training workdir: a few hundred steps of the tiny recipe on the embedded corpus
  (tests/evals/trained_config.py), by the binary on 8 CPU devices. It runs far more than it
  compiles, so its process keeps XLA's optimisation (the session's other programs do without).
  Made once per session, in the session's shared cache folder under a file lock: with
  pytest-xdist's workers, the first to need it trains it and the others wait for it."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import filelock  # pylint: disable=import-outside-toplevel  (comes with transformers)
  from tests.processes import child_env  # pylint: disable=import-outside-toplevel
  workdir = os.path.join(os.environ["FLAVA_JAX_CACHE"], "trained_flava")
  done = workdir + ".trained"
  with filelock.FileLock(workdir + ".lock"):
    if not os.path.isfile(done):
      shutil.rmtree(workdir, ignore_errors=True)  # a run that did not finish
      repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      run = subprocess.run(
          [sys.executable, "-m", "flava_jax.main", "--config=tests/evals/trained_config.py",
           f"--workdir={workdir}"], cwd=repo, capture_output=True, text=True, check=False,
          env=child_env(optimised=True), timeout=1800)
      assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
      with open(done, "w", encoding="utf-8") as f:
        f.write("ok\n")
  return workdir


@pytest.fixture(scope="session")
def trained_params(trained_workdir):
  from flava_jax import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.load_checkpoint(trained_workdir).params


@pytest.fixture(scope="session")
def random_params():
  from flava_jax import trainer  # pylint: disable=import-outside-toplevel
  from flava_jax.models.config import FlavaConfig  # pylint: disable=import-outside-toplevel
  from flava_jax.models.flava import FlavaModel, init_params  # pylint: disable=C0415
  from tests.evals.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  model = FlavaModel(FlavaConfig.from_dict(tiny_config().model))
  return jax.device_get(init_params(model, trainer.init_key(123)))


@pytest.fixture(scope="session")
def ctx():
  """The evaluation context on all 8 fake devices, as a training run builds it."""
  from flava_jax import evaluate, experiment, sharding  # pylint: disable=C0415
  from tests.evals.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  mesh = sharding.make_mesh(config.sharding.mesh)
  assert mesh.size == 8
  return evaluate.make_context(experiment.parse(config)[1], mesh,
                               sharding.rules_from_config(config.sharding.rules), "")


# --- the order of the tests ---------------------------------------------------------------

# The longest files, longest first (their times on a worker of a 2-worker run, 2026-12-04: from
# 450 s for the multi-process jobs down to 70-130 s for the last ones). With pytest-xdist's
# workers (`-n 2 --dist loadfile --no-loadscope-reorder`, pyproject.toml; its `loadgroup` does not
# group under pytest 9) they start first, so that none starts last and runs alone while the other
# worker has nothing left. The evaluate binary's tests come before the evaluators': they make the
# trained workdir both use (a worker that needs it while the other makes it waits).
LONGEST_FIRST = ("tests/multihost/test_multihost.py", "tests/test_notebooks.py",
                 "tests/tasks/test_omni_task.py", "tests/test_resume_process.py",
                 "tests/tasks/test_flava_task.py", "tests/evals/test_evaluate_binary.py",
                 "tests/tasks/test_blip_task.py", "tests/test_sharded_step.py",
                 "tests/evals/test_evaluators.py", "tests/test_trainer.py", "tests/test_stages.py",
                 "tests/test_capfilt.py", "tests/models/test_parity.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: each file's tests keep their order


def pytest_unconfigure(config):
  del config
  for path in _MADE:
    shutil.rmtree(path, ignore_errors=True)
