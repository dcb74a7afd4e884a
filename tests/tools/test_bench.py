"""The bench tool on the tiny config: its figures are consistent, the peer runs, the largest
batch it reports fits. (Speeds are printed by the tool, never asserted.)"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import blip as blip_configs
from configs import flava as flava_configs
from flava_jax import convert_blip, experiment
from flava_jax.tasks import flava_batches as random_batches
from flava_jax.tasks.base import StepContext
from flava_jax.tools import bench, peer, peer_blip
from tests.processes import REPO, child_env


@pytest.fixture(scope="module")
def tiny_bench():
  return bench.Bench(bench.bench_config(flava_configs.get_config("tiny"), 16, 0, 0))


def test_random_batches_have_the_step_shapes_and_mask_statistics():
  task = experiment.parse(flava_configs.get_config("full"))[1]
  batch = task.random_batch("paired", 32)
  assert batch["pixels"].shape == (32, 224, 224, 3) and batch["pixels"].dtype == np.uint8
  assert batch["dvae_pixels"].shape == (32, 112, 112, 3)
  masked = batch["patch_mask"].sum(1)
  assert masked.max() <= 75 and masked.mean() > 65  # BEiT block masks of 75 patches
  labels = (batch["mlm_labels"] != -100).sum(1)
  assert labels.max() <= 32 and abs(labels.mean() / 77 - 0.15) < 0.03
  inputs = random_batches.transformers_inputs("paired", batch, 0.1)
  assert inputs["pixel_values"].shape == (32, 3, 224, 224)
  assert inputs["itm_labels"].dtype == np.int64 and set(np.unique(inputs["itm_labels"])) <= {0, 1}


def test_timings_are_consistent(tiny_bench, tmp_path):
  for kind in ("paired", "text"):  # the image step compiles in the largest-batch test
    t = tiny_bench.time(kind, 16, steps=3, warmup=1, profile_dir=str(tmp_path))
    assert any(name.endswith(".xplane.pb") for _, _, names in os.walk(tmp_path / kind)
               for name in names)
    assert t.min_seconds <= t.step_seconds <= t.max_seconds and t.steps == 3
    assert t.examples_per_second == pytest.approx(16 / t.step_seconds)
    assert t.flops_per_step == tiny_bench.exp.step_flops(kind, 16)
    # XLA counts the scanned stacks' bodies once, but never more than the whole step
    assert 0 < t.xla_flops_per_step < 1.5 * t.flops_per_step
    assert t.compiled_bytes > 0 and t.num_devices == jax.device_count() == 8
    assert "examples/s" in bench.format_timing(t)


def test_prediction_slots_cut_the_heads_flops():
  config = flava_configs.get_config("full")
  with_slots = experiment.parse(config)[1].step_flops("text", 1)
  config.loss.text_prediction_slots = 0
  without = experiment.parse(config)[1].step_flops("text", 1)
  # MLM over 128 of 512 positions: 3 x 2 x 384 x 768 x (768 + 30522) FLOPs fewer
  assert without - with_slots == pytest.approx(3 * 2 * 384 * 768 * (768 + 30522))


def test_largest_batch_fits_the_limit_and_one_unit_more_does_not(tiny_bench):
  unit = 8 * tiny_bench.data_parallel
  limit = 1.5 * tiny_bench.compiled_bytes("image", 2 * unit)
  found = tiny_bench.largest_batch("image", unit, limit, run=False)
  assert found["batch"] >= 2 * unit and found["compiled_bytes"] <= limit
  assert found["batch"] % unit == 0
  assert tiny_bench.compiled_bytes("image", found["batch"] + 2 * unit) > limit


def test_bench_binary_with_the_transformers_peer(tmp_path):
  out = tmp_path / "bench.json"
  env = child_env(devices=2)
  proc = subprocess.run(
      [sys.executable, "-m", "flava_jax.tools.bench", "--batch=4", "--kinds=paired",
       "--steps=2", "--warmup=1", "--peer=transformers", "--peer_modes=eager",
       f"--json_out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "flava_jax / transformers eager" in proc.stdout
  row = next(line for line in proc.stdout.splitlines() if line.startswith("| cpu | tiny"))
  assert row.count("|") == 10 and "| paired |" in row
  result = json.loads(out.read_text())
  ours, theirs = result["timings"]
  assert (ours["name"], theirs["name"]) == ("flava_jax", "transformers eager")
  assert ours["batch"] == theirs["batch"] == 4 and theirs["step_seconds"] > 0
  # Two independent FLOP counts of the same step: our analytic one and PyTorch's counter (which
  # sees the heads on the labelled positions only, and no slot padding)
  assert 0.75 < theirs["flops_per_step"] / ours["flops_per_step"] < 1.1


def test_blip_peer_trains_our_parameters_at_our_flop_count():
  """BLIP's PyTorch peer (the reference's pretraining step on transformers' modules) has the
  same trainable parameters as our model (the decoder sharing all but its self-attention), and
  PyTorch's FLOP counter of its step agrees with our analytic count."""
  task = experiment.parse(blip_configs.get_config("tiny"))[1]
  request = dict(task.peer_request(), kinds=["paired"], modes=["eager"], batch=8, steps=1,
                 warmup=0, max_batch_kinds=[], memory_limit_bytes=None)
  model = peer_blip.build(request)
  params = nn.meta.unbox(task.init_params(jax.random.key(0)))
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
      np.size(x) for x in jax.tree.leaves(params))
  assert model.image_queue.shape == (64, request["loss"]["queue_size"])
  entry = peer.run(request)["modes"]["eager"]["paired"]
  assert entry["step_seconds"] > 0
  assert 0.9 < entry["flops_per_step"] / task.step_flops("paired", 8) < 1.1


def test_blip_peer_computes_our_losses_on_our_weights(tmp_path):
  """On our weights (through the converter), queues and batch, the peer's ITC, ITM and LM equal
  our step's: with 2 rows, each row's hard negative is the other row for both."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import (  # pylint: disable=import-outside-toplevel
      BlipForConditionalGeneration, BlipForImageTextRetrieval)
  config = blip_configs.get_config("tiny")
  config.global_batch, config.loss.queue_size, config.loss.alpha_ramp_steps = 2, 8, 0
  task = experiment.parse(config)[1]
  params = nn.meta.unbox(task.init_params(jax.random.key(0)))
  extra = task.init_extra(jax.random.key(1), params)
  batch = task.random_batch("paired", 2, seed=3)
  ctx = StepContext(mesh=None, local_batch=2, step=0)
  ours = jax.jit(lambda p, e, b: task.loss("paired", p, e, None, b, jax.random.key(0), ctx))(
      params, extra, batch).metrics

  request = task.peer_request()
  model = peer_blip.build(request)
  retrieval_dir, captioning_dir = convert_blip.to_transformers(task.model, params, str(tmp_path))
  retrieval = BlipForImageTextRetrieval.from_pretrained(retrieval_dir)
  captioning = BlipForConditionalGeneration.from_pretrained(captioning_dir)
  model.text_decoder.load_state_dict(captioning.text_decoder.state_dict())
  for name, theirs in (("vision", "vision_model"), ("text_encoder", "text_encoder"),
                       ("vision_proj", "vision_proj"), ("text_proj", "text_proj"),
                       ("itm_head", "itm_head")):
    getattr(model, name).load_state_dict(getattr(retrieval, theirs).state_dict())
  for momentum, online in zip(model.momentum, model.online):  # ours start equal too
    momentum.load_state_dict(online.state_dict())
  with torch.no_grad():
    model.temp.fill_(float(params["temp"]))
    model.image_queue.copy_(torch.from_numpy(np.array(extra["image_queue"]).T))
    model.text_queue.copy_(torch.from_numpy(np.array(extra["text_queue"]).T))
  _, theirs, _, _ = model(**peer_blip.inputs(request, 2, 3, torch.device("cpu")))
  for name in ("itc", "itm", "lm"):
    assert float(theirs[name]) == pytest.approx(float(ours[name]), rel=1e-4, abs=1e-5), name
