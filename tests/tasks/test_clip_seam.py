"""Proof of the Task seam: a CLIP-style two-tower task (tasks/clip.py + configs/clip.py, nothing
edited outside tasks/, configs/ and tests/) trains through `python -m flava_jax.main`, resumes
exactly after SIGKILL, is benched by the bench tool and compiled by the AOT tool."""

import signal

from configs import clip as clip_configs
from flava_jax import warm_start
from flava_jax.tools import aot, bench
from tests.test_resume_process import (_finish, _read_until, _resumed_from, _start,
                                       _start_uninterrupted, _wait)
from tests.trees import assert_trees_equal

STEPS = 8
OVERRIDES = {"global_batch": 16, "total_steps": STEPS, "log_every_steps": 1,
             "checkpoint.every_steps": 2, "optimizer.warmup_steps": 2}


def test_clip_trains_through_the_binary_and_resumes_exactly_after_sigkill(tmp_path):
  # The uninterrupted reference starts after the kill (see _start_uninterrupted).
  workdir = str(tmp_path / "run")
  proc = _start(workdir, config="clip.py", overrides=OVERRIDES)
  lines = _read_until(proc, "checkpoint 4 saving")  # so checkpoint 2 is complete
  assert any(line.startswith("CLIP-style two towers tiny:") for line in lines), lines[:5]
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  uninterrupted = _start_uninterrupted("clip.py", OVERRIDES, str(tmp_path / "uninterrupted"))
  out = _finish(workdir, config="clip.py", overrides=OVERRIDES)
  _wait(uninterrupted)
  reference = warm_start.read_workdir_params(str(tmp_path / "uninterrupted"), "reference")
  assert 2 <= _resumed_from(out) < STEPS, out[-2000:]
  assert "eval retrieval: i2t_r1" in out  # the task's predict functions feed the evaluator
  assert_trees_equal(warm_start.read_workdir_params(workdir, "run"), reference)


def test_clip_is_benched_and_compiled_ahead_of_time():
  config = bench.bench_config(clip_configs.get_config("tiny"), 16, 0, 0)
  tool = bench.Bench(config)
  timing = tool.time("paired", 16, steps=2, warmup=1)
  assert timing.flops_per_step == tool.exp.step_flops("paired", 16) > 0
  assert timing.min_seconds <= timing.step_seconds <= timing.max_seconds
  reports, shardings = aot.compile_steps(config, aot.tpu_devices("v5p:2x2x1"))
  assert [r.kind for r in reports] == ["paired"]
  assert reports[0].temp_bytes > 0 and reports[0].argument_bytes > 0
  assert set(shardings) == {"image_encoder", "text_encoder", "image_projection",
                            "text_projection", "logit_scale"}
