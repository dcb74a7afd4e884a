"""The AOT tool compiles the tiny train step for a small TPU topology on this CPU machine."""

import pytest

from configs import flava as flava_configs
from flava_jax import flops, sharding
from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.tools import aot


def test_tiny_steps_compile_for_a_v5p_slice():
  config = flava_configs.get_config("tiny")
  config.global_batch = 16  # 4 per chip: the ratios below are calibrated for it
  devices = aot.tpu_devices("v5p:2x2x1")
  assert len(devices) == 4 and "TPU" in devices[0].device_kind
  reports, param_shardings = aot.compile_steps(config, devices)
  assert [r.kind for r in reports] == ["paired", "image", "text"]
  for r in reports:
    assert r.argument_bytes > 0 and r.temp_bytes > 0 and r.total_bytes > r.temp_bytes
    # XLA also counts elementwise work (softmax, LayerNorm, Adam); matmuls dominate.
    ratio = r.xla_flops_per_chip * len(devices) / r.analytic_flops_per_step
    assert 0.8 < ratio < 1.5, (r.kind, ratio)
  paired = reports[0]
  assert paired.temp_bytes > reports[2].temp_bytes  # two encoders + fusion vs one encoder
  text = aot.format_report(reports, "v5p:2x2x1", 4, {"data": 4})
  assert "[paired] global batch 16" in text and "ideal step time" in text
  described = sharding.describe(param_shardings)
  # Specs name mesh axes even where they have size 1 (tiny: data=4, fsdp=1, tensor=1).
  assert described["['text_encoder']['encoder']['layers']['mlp']['wi']['kernel']"] == \
      "(None, 'fsdp', 'tensor')"


def test_analytic_flops_grow_as_expected():
  full = FlavaConfig.from_dict(flava_configs.get_config("full").model)
  image = flops.image_encoder_flops(full)
  # ViT-B/16 at 224 px: about 17.6 G multiply-adds per image, i.e. 35 GFLOP.
  assert image == pytest.approx(35.1e9, rel=0.03)
  paired = flops.train_flops_per_example(full, "paired", 77)
  assert paired > 3 * 2 * image  # two image passes, trained
  dvae = DVAEConfig.from_dict(flava_configs.get_config("full").dvae)
  assert flops.dvae_encoder_flops(dvae, 112) > 1e10
  with pytest.raises(ValueError, match="batch kind"):
    flops.train_flops_per_example(full, "audio", 10)


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(RuntimeError, match="cannot describe TPU topology"):
    aot.tpu_devices("v99:1x1")
