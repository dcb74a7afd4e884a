"""The tri-modal task (tasks/omni.py, configs/omni.py): the step's loss, every objective and every
gradient on meshes (8,1,1), (4,2,1) and (2,2,2) equal one device's; the step glues
each objective to the right positions (a modality left out of every row contributes no token-
level loss, and removing it changes what the others see); the step's arrays and FLOPs; start-up
errors; the bench and AOT tools on its step; the binary killed (SIGKILL) after a checkpoint and
restarted ends bit-identical to an uninterrupted run."""

import jax
import numpy as np
import pytest

from configs import omni as omni_configs
from flava_jax import experiment
from flava_jax.tasks.base import StepContext
from tests import meshes
from tests.trees import assert_metrics_close, assert_trees_close, assert_trees_equal

BATCH = 24
LOCAL_BATCH = 3  # the smallest shard among the meshes: the match task's replacements use it
SAMPLES = 6400  # 0.4 s: nine frames of the tiny encoder


def small_config(sizes):
  config = omni_configs.get_config("tiny")
  config.global_batch = BATCH
  config.audio_samples = SAMPLES
  config.text_length = 16
  config.model.image.image_size = 32  # 4 x 4 patches; the dVAE's view is 32 px: 4 x 4 codes
  for section in (config.model.image, config.model.text, config.model.multimodal, config.audio):
    section.num_layers = 1
  config.sharding.mesh = sizes
  config.optimizer.warmup_steps = 0
  config.optimizer.eps = 1e-3  # see tests/test_sharded_step.py: Adam's first step near zero
  return config


def tiny_experiment(sizes, devices=None):
  return experiment.Experiment(small_config(sizes), devices)


def test_the_loss_and_gradients_match_one_device_on_meshes():
  exp1 = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  initial = jax.device_get(exp1.create_state(jax.random.key(0)))
  frozen = exp1.task.init_frozen(0, {}, ("trimodal",))
  batch = exp1.task.random_batch("trimodal", BATCH, seed=1)
  assert not batch["present"].all() and batch["audio_mask"].sum(1).min() < SAMPLES

  def loss_and_grads(exp):
    return meshes.loss_and_grads(exp, "trimodal", initial, frozen, batch, LOCAL_BATCH,
                                 jax.random.key(3))

  ref_metrics, ref_grads = loss_and_grads(exp1)
  for name in ("mlm", "mvm_class", "dtr", "dir", "match", "mam_contrastive", "mvm_regression",
               "mam_regression"):
    assert np.isfinite(float(ref_metrics[name])) and float(ref_metrics[name]) > 0, name
  assert abs(float(ref_metrics["match"]) - np.log(5)) < 0.5  # near chance at init
  untouched = [g for g in ref_grads if not any(np.abs(x).max() > 0
                                                for x in jax.tree.leaves(ref_grads[g]))]
  assert not untouched, untouched  # every part of the model has a gradient
  for sizes in (dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
                dict(data=2, fsdp=2, tensor=2)):
    metrics, grads = loss_and_grads(tiny_experiment(sizes))
    assert_metrics_close(metrics, ref_metrics, sizes)
    assert_trees_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def test_objectives_read_the_modalities_present():
  task = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]).task
  params = task.init_params(jax.random.key(0))
  frozen = task.init_frozen(0, {}, ("trimodal",))
  batch = task.random_batch("trimodal", 6, seed=2)
  ctx = StepContext(mesh=None, local_batch=6)
  metrics = jax.jit(lambda b: task.loss("trimodal", params, {}, frozen, b, jax.random.key(0),
                                        ctx).metrics)
  every = metrics(dict(batch, present=np.ones((6, 3), bool)))
  for i, objectives in enumerate((("mlm",), ("mvm_regression", "mvm_class"),
                                  ("mam_regression", "mam_contrastive"))):
    present = np.ones((6, 3), bool)
    present[:, i] = False
    without = metrics(dict(batch, present=present))
    for name in objectives:  # no row has the modality: its token-level losses count nothing
      assert float(without[name]) == 0.0 and float(every[name]) > 0, name
    # the decoders see the others only, so their losses change; matching uses clean inputs
    assert float(without["dtr"]) != pytest.approx(float(every["dtr"]), rel=1e-6)
    assert float(without["match"]) == pytest.approx(float(every["match"]), rel=1e-6)


def test_the_step_reads_its_arrays_and_counts_its_flops():
  task = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]).task
  spec = task.batch_spec("trimodal", 4)
  assert spec["pixels"].shape == (4, 32, 32, 3) and spec["dvae_pixels"].shape == (4, 32, 32, 3)
  assert spec["patch_mask"].shape == (4, 16) and spec["frame_mask"].shape == (4, 9)
  assert task.sequences.total == 1 + 16 + 17 + 9
  assert task.step_flops("trimodal", 8) == pytest.approx(2 * task.step_flops("trimodal", 4))
  assert "26 cross-modal" not in task.describe(None) and "43 cross-modal" in task.describe(None)


def test_start_up_errors_name_the_field():
  config = small_config(dict(data=1, fsdp=1, tensor=1))
  config.audio_samples = 300
  with pytest.raises(ValueError, match="audio_samples=300"):
    experiment.Experiment(config)
  config = small_config(dict(data=1, fsdp=1, tensor=1))
  config.text_decoder.num_heads = 5
  with pytest.raises(ValueError, match="text_decoder.hidden_size=64 is not divisible"):
    experiment.Experiment(config)
  config = small_config(dict(data=1, fsdp=1, tensor=1))
  config.loss.mam_temperature = -1.0
  with pytest.raises(ValueError, match="loss.mam_temperature"):
    experiment.Experiment(config)
  with pytest.raises(ValueError, match="tiny or base"):
    omni_configs.get_config("huge")


def test_the_step_is_benched_and_compiled_ahead_of_time():
  """The bench and AOT tools run the tri-modal step: timed on one CPU device, compiled for an
  abstract v5p slice of 4 chips (libtpu; 3 rows each, the match task's least)."""
  from flava_jax.tools import aot, bench  # pylint: disable=import-outside-toplevel
  config = bench.bench_config(small_config(dict(data=1, fsdp=1, tensor=1)), 12, 0, 0)
  tool = bench.Bench(config, jax.devices()[:1])
  timing = tool.time("trimodal", 12, steps=2, warmup=1)
  assert timing.flops_per_step == tool.exp.step_flops("trimodal", 12) > 0
  assert timing.step_seconds > 0
  config.sharding.mesh = dict(data=-1, fsdp=1, tensor=1)
  reports, shardings = aot.compile_steps(config, aot.tpu_devices("v5p:2x2x1"))
  assert [r.kind for r in reports] == ["trimodal"]
  assert reports[0].temp_bytes > 0 and reports[0].argument_bytes > 0
  assert set(shardings) == set(tool.exp.groups())


KILL_STEPS = 6
# The binary's config (written for the test): small_config on a small spoken part of the test's
# own, checkpoints every 2 steps, no evaluations.
KILLED_CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests.tasks.test_omni_task import small_config


def get_config():
  config = small_config(dict(data=-1, fsdp=1, tensor=1))
  config.total_steps, config.log_every_steps, config.evals = {steps}, 1, {{}}
  config.data.corpora.spoken.update(source="array_record", paths={paths!r})
  config.checkpoint.every_steps = 2
  return config
"""


def test_sigkill_through_the_binary_then_restart_is_exact(tmp_path):
  """Killed (SIGKILL) once checkpoint 2 is complete and started again, the binary ends with the
  parameters and optimizer state of an uninterrupted run, bit for bit (the data pipeline's
  masks, modality draws and match classes, and the step's replacements, all follow the
  checkpointed state)."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from flava_jax.data import embedded  # pylint: disable=import-outside-toplevel
  from tests.processes import child_env  # pylint: disable=import-outside-toplevel
  from tests.tasks.test_blip_task import _newest_state  # pylint: disable=C0415
  from tests.test_resume_process import (  # pylint: disable=import-outside-toplevel
      REPO, _read_until, _resumed_from, _start_logged, _wait)

  corpus = tmp_path / "spoken"
  corpus.mkdir()
  embedded.build_spoken(str(corpus), {"train": 40, "test": 2})
  config_file = tmp_path / "omni_small.py"
  config_file.write_text(KILLED_CONFIG.format(
      repo=REPO, steps=KILL_STEPS,
      paths=str(corpus / "spoken-train-00000-of-00001.array_record")))
  # All three runs are the binary on one CPU device: exactness after a kill does not depend on
  # the mesh (the mesh test above covers that), and one device compiles and runs the step in a
  # fraction of 8 fake devices' time.
  env = child_env(devices=1)
  command = lambda workdir: [sys.executable, "-m", "flava_jax.main", f"--config={config_file}",
                             f"--workdir={workdir}"]
  # The uninterrupted reference starts after the kill (see _start_uninterrupted).
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(command(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = _read_until(proc, "checkpoint 4 saving")  # so checkpoint 2 is complete
  assert any(line.startswith("omni: text 16 + image 17 + audio") for line in lines), lines[:5]
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  uninterrupted = _start_logged(command(str(tmp_path / "uninterrupted")),
                                str(tmp_path / "uninterrupted.out"))
  done = subprocess.run(command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        check=False, timeout=900)
  _wait(uninterrupted)  # on one CPU device, as the runs here (child_env(devices=1))
  ref_step, reference = _newest_state(str(tmp_path / "uninterrupted"))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 2 <= _resumed_from(done.stdout) < KILL_STEPS, done.stdout[-2000:]
  step, state = _newest_state(workdir)
  assert step == ref_step == KILL_STEPS and os.path.isdir(workdir)
  assert_trees_equal(state["params"], reference["params"])
  assert_trees_equal(state["opt_state"], reference["opt_state"])
