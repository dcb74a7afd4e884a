"""Splash attention (Pallas, TPU): the interpreted kernel equals XLA's attention on every real
position, sharded or not, with its gradients; the tiny train step compiles with it for TPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import flava as flava_configs
from flava_jax import sharding
from flava_jax.models.splash import splash_attention
from flava_jax.models.transformer import attention_kernel
from flava_jax.tools import aot
from tests.trees import assert_trees_close


def _inputs(length, lengths, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((len(lengths), length, 4, 16)), jnp.float32)
             for _ in range(3))
  mask = jnp.asarray(np.arange(length)[None] < np.asarray(lengths)[:, None])
  return q, k, v, mask


@pytest.mark.parametrize("length, lengths", [(77, [77, 50, 10, 3]), (197, None), (128, [128, 1])],
                         ids=["padded_captions", "no_mask_197", "one_block"])
def test_splash_matches_xla_on_real_positions(length, lengths):
  q, k, v, mask = _inputs(length, lengths or [length] * 2)
  mask_arg = None if lengths is None else mask
  real = np.asarray(mask)[..., None, None]

  def loss(impl, q, k, v):
    if impl == "splash":
      out = splash_attention(q, k, v, mask_arg, interpret=True)
    else:
      out = attention_kernel(q, k, v, mask_arg, "xla")
    return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

  (ref_loss, ref), ref_grads = jax.value_and_grad(
      lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (got_loss, got), grads = jax.value_and_grad(
      lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=2e-6)
  assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-5)
  assert_trees_close(grads, ref_grads, atol=2e-5)


def test_splash_under_a_mesh_runs_per_device_shard():
  q, k, v, mask = _inputs(77, [77, 60, 40, 20, 77, 5, 30, 70])
  ref = attention_kernel(q, k, v, mask, "xla")
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=2))
  rules = [("batch", ("data", "fsdp")), ("act_heads", "tensor")]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, mask)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6)


def test_tiny_step_with_splash_compiles_for_tpu():
  config = flava_configs.get_config("tiny")
  config.global_batch = 16
  config.model.attention_impl = "splash"
  reports, _ = aot.compile_steps(config, aot.tpu_devices("v5p:2x2x1"), ("paired",))
  assert not reports[0].error and reports[0].temp_bytes > 0
