"""On 8 fake CPU devices, every mesh gives the single-device loss and gradients; the train step
runs sharded with donated state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flava_jax
from configs import flava as flava_configs
from flava_jax import sharding, train
from flava_jax.data.masking import IGNORE_INDEX
from flava_jax.losses.flava import BATCH_KEYS, LossConfig

BATCH = 16
MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
          dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module")
def setup():
  config = flava_configs.get_config("tiny")
  model = flava_jax.FlavaModel(flava_jax.FlavaConfig.from_dict(config.model))
  dvae = flava_jax.DVAE(flava_jax.DVAEConfig.from_dict(config.dvae))
  params = flava_jax.init_params(model, jax.random.key(0))
  dvae_params = flava_jax.init_dvae_params(dvae, jax.random.key(1), image_size=32)
  rules = sharding.rules_from_config(config.sharding.rules)
  return model, dvae, params, dvae_params, rules


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


LOSS = LossConfig(itm_negative_rate=0.5)


@pytest.mark.parametrize("kind", ["paired", "image", "text"])
def test_loss_and_gradients_match_single_device_on_every_mesh(setup, kind):
  model, dvae, params, dvae_params, rules = setup
  batch = make_batch(kind)
  rng = jax.random.key(3)
  local_batch = 2  # the smallest per-shard batch among the meshes; ITM negatives depend on it

  def loss_and_grads(mesh):
    loss_fn = train.make_loss_fn(model, dvae, LOSS, kind, mesh, local_batch)
    fn = jax.value_and_grad(lambda p, b: loss_fn(p, dvae_params, b, rng), has_aux=True)
    if mesh is None:
      return jax.jit(fn)(params, batch)
    shardings = train.param_shardings(model, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
      sharded_params = jax.device_put(params, shardings)
      sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
      return jax.jit(fn)(sharded_params, sharded_batch)

  (ref_loss, ref_metrics), ref_grads = loss_and_grads(None)
  assert np.isfinite(float(ref_loss))
  if kind == "paired":
    assert 0 < float(ref_metrics["itm_negative_fraction"]) < 1
  for sizes in MESHES:
    mesh = sharding.make_mesh(sizes)
    if kind == "paired":
      # Same negatives on every mesh: 2-row groups fit inside every mesh's shards.
      assert BATCH // sharding.data_parallel_size(mesh) % local_batch == 0
    (loss, metrics), grads = loss_and_grads(mesh)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5, (sizes, float(loss), float(ref_loss))
    for name in ref_metrics:
      assert abs(float(metrics[name]) - float(ref_metrics[name])) <= 1e-5, (sizes, name)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)
    worst = max(jax.tree_util.tree_leaves(diffs))
    assert worst <= 1e-5, (sizes, worst)
    # Gradients reach every parameter the objective uses.
    norms = jax.tree_util.tree_map(lambda g: float(jnp.sum(jnp.abs(g))), ref_grads)
    used = {"paired": ["image_encoder", "text_encoder", "multimodal_encoder", "itm_head",
                       "mmm_image_head", "mmm_text_head", "image_projection", "logit_scale"],
            "image": ["image_encoder", "mim_head"], "text": ["text_encoder", "mlm_head"]}[kind]
    for name in used:
      assert sum(jax.tree_util.tree_leaves(norms[name])) > 0, name


def test_train_step_runs_sharded_and_lowers_the_loss(setup):
  model, dvae, _, dvae_params, rules = setup
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  tx = train.make_optimizer(dict(learning_rate=3e-3, warmup_steps=2), total_steps=40)
  state, shardings = train.create_train_state(model, tx, jax.random.key(0), mesh, rules)
  qkv = state.params["image_encoder"]["encoder"]["layers"]["attention"]["qkv_kernel"]
  assert not qkv.sharding.is_fully_replicated  # created sharded, never materialised whole
  mu = state.opt_state[0].mu["image_encoder"]["encoder"]["layers"]["attention"]["qkv_kernel"]
  assert mu.sharding == qkv.sharding  # optimizer state sharded like its parameter
  step = train.make_train_step(model, dvae, tx, LOSS, mesh, rules, "paired", shardings,
                               local_batch=BATCH // sharding.data_parallel_size(mesh))
  batch = jax.device_put(make_batch("paired", seed=1), sharding.batch_sharding(mesh))
  losses = []
  for _ in range(12):
    old = state
    state, metrics = step(state, dvae_params, batch, jax.random.key(5))
    assert old.params["logit_scale"].is_deleted()  # donated
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 12
  assert losses[-1] < losses[0] - 0.5, losses
  assert 0.0 <= float(state.params["logit_scale"]) <= 4.6052


@pytest.mark.parametrize("variant, limit", [("tiny", 0.02), ("full", 0.002)])
def test_fsdp_leaves_few_parameters_replicated(setup, variant, limit):
  """Under a pure FSDP mesh nearly every parameter byte is split across devices."""
  rules = setup[-1]
  config = flava_configs.get_config(variant)
  model = flava_jax.FlavaModel(flava_jax.FlavaConfig.from_dict(config.model))
  shapes = jax.eval_shape(lambda: flava_jax.init_params(model, jax.random.key(0)))
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  shardings = train.param_shardings(model, mesh, rules)
  total = replicated = 0
  for leaf, sh in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))):
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
