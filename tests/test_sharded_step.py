"""On 8 fake CPU devices, every mesh gives the single-device train step (paired batches: loss,
metrics, updated parameters and Adam state, output shardings) and the single-device loss and
gradients (image-only and text-only batches); the train step runs sharded with donated state."""

import jax
import numpy as np
import pytest

import flava_jax
from configs import flava as flava_configs
from flava_jax import experiment, run_once, sharding, train
from flava_jax.data.masking import IGNORE_INDEX
from flava_jax.losses.flava import BATCH_KEYS
from tests import meshes
from tests.trees import assert_metrics_close, assert_trees_close, matched_leaves

BATCH = 16
MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
          dict(data=2, fsdp=2, tensor=2)]


def tiny_experiment(sizes, devices=None, **loss):
  config = flava_configs.get_config("tiny")
  config.global_batch = BATCH
  config.sharding.mesh = sizes
  config.optimizer.warmup_steps = 0
  # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 it is a sign for gradients near
  # zero, which a float rounding flips. A larger eps keeps the update a smooth function of the
  # gradient, so that parameters compare as tightly as the gradients do.
  config.optimizer.eps = 1e-3
  config.loss.itm_negative_rate = 0.5
  for key, value in loss.items():
    config.loss[key] = value
  return experiment.Experiment(config, devices)


@pytest.fixture(scope="module")
def setup():
  exp = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  # Host copies: every step below donates the device arrays made from them. The whole initial
  # state (parameters, fresh Adam state, step 0) is created once, on one device; each mesh's step
  # starts from it placed in that mesh's shardings (no per-mesh, per-kind initialisation to
  # compile; test_train_step_runs_sharded_and_lowers_the_loss creates a state sharded).
  initial = jax.device_get(exp.create_state(jax.random.key(0)))
  dvae_params = jax.device_get(
      flava_jax.init_dvae_params(exp.task.dvae, jax.random.key(1), image_size=32))
  return exp, initial, dvae_params, exp.rules


def make_batch(kind, seed=0):
  rng = np.random.default_rng(seed)
  length = 12
  ids = rng.integers(5, 1024, (BATCH, length))
  lengths = rng.integers(4, length + 1, BATCH)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * mask
  chosen = (rng.random(ids.shape) < 0.3) & (mask == 1)
  chosen[:, 0] = True
  batch = dict(
      pixels=rng.normal(size=(BATCH, 64, 64, 3)).astype(np.float32),
      dvae_pixels=rng.uniform(0.1, 0.9, (BATCH, 32, 32, 3)).astype(np.float32),
      patch_mask=rng.random((BATCH, 16)) < 0.4,
      input_ids=ids.astype(np.int32),
      input_ids_masked=np.where(chosen, 4, ids).astype(np.int32),
      attention_mask=mask,
      mlm_labels=np.where(chosen, ids, IGNORE_INDEX).astype(np.int32))
  return {k: batch[k] for k in BATCH_KEYS[kind]}




def test_the_whole_train_step_matches_one_device_on_every_mesh(setup):
  """Loss, metrics, updated parameters and Adam state after one donated step equal the
  single-device step's; the outputs keep the state's shardings."""
  exp1, initial, dvae_params, _ = setup
  kind = "paired"
  batch = make_batch(kind)
  rng = jax.random.key(3)
  local_batch = 2  # the smallest per-shard batch among the meshes; ITM negatives depend on it

  def one_step(exp):
    state = jax.device_put(initial, exp.state_shardings)
    step = train.make_train_step(exp.task, kind, exp.tx, exp.mesh, exp.rules,
                                 exp.state_shardings, local_batch, keep=exp.keep_groups(kind),
                                 compiler_options=run_once.compiler_options())
    frozen = jax.device_put(dvae_params, sharding.replicated(exp.mesh))
    old_scale = state.params["logit_scale"]
    new, metrics = step(state, frozen, jax.device_put(batch, sharding.batch_sharding(exp.mesh)),
                        rng)
    assert old_scale.is_deleted()  # the state was donated
    for path, leaf, want in matched_leaves(new, exp.state_shardings):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
    return jax.device_get(new), jax.device_get(metrics)

  ref_state, ref_metrics = one_step(exp1)
  assert np.isfinite(float(ref_metrics["loss"]))
  assert 0 < float(ref_metrics["itm_negative_fraction"]) < 1
  for sizes in MESHES:
    exp = tiny_experiment(sizes)
    # Same negatives on every mesh: 2-row groups fit inside every mesh's shards.
    assert BATCH // exp.data_parallel % local_batch == 0
    state, metrics = one_step(exp)
    assert_metrics_close(metrics, ref_metrics, sizes)
    assert int(state.step) == int(ref_state.step) == 1
    assert_trees_close(state.params, ref_state.params, atol=1e-5, rtol=1e-5)
    assert_trees_close(state.opt_state, ref_state.opt_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_unimodal_losses_and_gradients_match_one_device_on_every_mesh(setup, kind):
  """The image-only and text-only batches' loss, metrics and gradients (the optimizer's update on
  meshes is the paired test's) equal the single-device figures; the gradients keep the
  parameters' shardings, and the tower a kind does not use gets none."""
  exp1, initial, dvae_params, _ = setup
  batch = make_batch(kind)

  def loss_and_grads(exp):
    return meshes.loss_and_grads(exp, kind, initial, dvae_params, batch, 2, jax.random.key(3))

  ref_metrics, ref_grads = loss_and_grads(exp1)
  assert np.isfinite(float(ref_metrics["loss"]))
  unused = "text_encoder" if kind == "image" else "image_encoder"
  assert all(np.all(g == 0) for g in jax.tree.leaves(ref_grads[unused]))
  used = "image_encoder" if kind == "image" else "text_encoder"
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(ref_grads[used]))
  for sizes in MESHES:
    metrics, grads = loss_and_grads(tiny_experiment(sizes))
    assert_metrics_close(metrics, ref_metrics, sizes)
    assert_trees_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def test_train_step_runs_sharded_and_lowers_the_loss():
  exp = tiny_experiment(dict(data=2, fsdp=2, tensor=2))
  state = exp.create_state()
  qkv = state.params["image_encoder"]["encoder"]["layers"]["attention"]["qkv_kernel"]
  assert not qkv.sharding.is_fully_replicated  # created sharded, never materialised whole
  mu = state.opt_state[0].mu["image_encoder"]["encoder"]["layers"]["attention"]["qkv_kernel"]
  assert mu.sharding == qkv.sharding  # optimizer state sharded like its parameter
  step = exp.train_step("paired")
  frozen = exp.frozen()
  batch = jax.device_put(make_batch("paired", seed=1), sharding.batch_sharding(exp.mesh))
  losses = []
  for _ in range(12):
    old = state
    state, metrics = step(state, frozen, batch, jax.random.key(5))
    assert old.params["logit_scale"].is_deleted()  # donated
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 12
  assert losses[-1] < losses[0] - 0.5, losses
  assert 0.0 <= float(state.params["logit_scale"]) <= 4.6052


@pytest.mark.parametrize("variant, limit", [("tiny", 0.02), ("full", 0.002)])
def test_fsdp_leaves_few_parameters_replicated(setup, variant, limit):
  """Under a pure FSDP mesh nearly every parameter byte is split across devices."""
  config = flava_configs.get_config(variant)
  config.sharding.mesh = dict(data=1, fsdp=8, tensor=1)
  config.global_batch = 8
  exp = experiment.Experiment(config)
  shapes = jax.eval_shape(exp.task.init_params, jax.random.key(0))
  shardings = exp.param_shardings()
  total = replicated = 0
  for _, leaf, sh in matched_leaves(
      shapes, shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)):
    total += leaf.size
    if sh.is_fully_replicated:
      replicated += leaf.size
  assert replicated / total < limit, replicated / total


def test_mesh_errors_name_the_field():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(dict(data=4, fsdp=4, tensor=1))
  with pytest.raises(ValueError, match="sharding.mesh.pipeline"):
    sharding.make_mesh(dict(pipeline=2))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(dict(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config([("embed", "model")])
  assert sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2)).shape["data"] == 2
