"""Gradient accumulation, frozen parameter groups, and runs started from a transformers checkpoint
or a training workdir."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import flava
from flava_jax import convert, sharding, train, trainer, warm_start
from flava_jax.data import pipeline
from flava_jax.losses.flava import LossConfig
from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE
from flava_jax.models.flava import FlavaModel, init_params


def _text_batch(rows):
  config = flava.get_config("tiny")
  config.global_batch = rows
  config.data.corpora = {"text": config.data.corpora.text.to_dict()}
  data = pipeline.make_pipeline(config)
  _, batch = next(data)
  data.close()
  return batch


def test_accumulated_gradients_equal_the_whole_batch_gradients():
  config = flava.get_config("tiny")
  model = FlavaModel(FlavaConfig.from_dict(config.model))
  params = init_params(model, jax.random.key(0))
  mesh = sharding.make_mesh({"data": -1})
  loss_fn = train.make_loss_fn(model, None, LossConfig(), "text", mesh, 1)
  batch = _text_batch(8)
  # Rows in identical pairs: each of the two micro-batches (every other row) is the 8-row batch.
  doubled = {k: np.repeat(v, 2, axis=0) for k, v in batch.items()}

  def run(fn, *args):
    with jax.set_mesh(mesh):
      return jax.jit(fn)(*args)

  rng = jax.random.key(1)
  whole = run(lambda p, b: jax.value_and_grad(
      lambda q: loss_fn(q, None, b, rng), has_aux=True)(p), params,
      pipeline.to_global(batch, mesh))
  accumulated = run(lambda p, b: train.accumulated_value_and_grad(
      lambda q, m, r: loss_fn(q, None, m, r), p, b, rng, 2, mesh), params,
      pipeline.to_global(doubled, mesh))
  (loss, metrics), grads = whole
  (acc_loss, acc_metrics), acc_grads = accumulated
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(acc_metrics["mlm"], metrics["mlm"], rtol=1e-5)
  assert float(jnp.abs(jax.tree.leaves(grads["text_encoder"])[0]).sum()) > 0
  for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_grad_accum_must_divide_the_per_shard_rows(tmp_path):
  config = flava.get_config("tiny")
  config.global_batch = 16  # 2 rows per device on 8 devices
  config.grad_accum = 4
  with pytest.raises(ValueError, match="grad_accum=4 does not divide the 2 rows"):
    trainer.check_config(config)


@pytest.mark.parametrize("field, value, match", [
    ("model_from", "/nowhere", r"init.model_from='/nowhere': no such directory"),
    ("dvae_from", "TMP", r"init.dvae_from=.* is neither a training workdir"),
])
def test_init_sources_are_checked_at_start_up(field, value, match, tmp_path):
  config = flava.get_config("tiny")
  config.init[field] = str(tmp_path) if value == "TMP" else value
  with pytest.raises(FileNotFoundError, match=match):
    trainer.check_config(config)


def test_model_from_and_dvae_from_a_transformers_checkpoint(tiny_hf_dir):
  reference_model, reference = convert.from_transformers(tiny_hf_dir)
  _, reference_dvae = convert.dvae_from_transformers(tiny_hf_dir)
  model = FlavaModel(reference_model.config)
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_from_config(flava.get_config("tiny").sharding.rules)
  state, _ = train.create_train_state(model, train.make_optimizer({}, 10), jax.random.key(3),
                                      mesh, rules)
  params, notes = warm_start.initial_params(state.params,
                                            warm_start.InitConfig(model_from=tiny_hf_dir))
  assert notes and "random" not in notes[0]
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Shardings are the run's own.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    assert a.sharding == b.sharding

  dvae_cfg = DVAEConfig.from_dict(dict(convert.dvae_config_from_transformers(
      convert.transformers_io.read_config(tiny_hf_dir)["image_codebook_config"]).to_dict(),
                                       decoder=True))
  dvae_params = trainer._dvae_params(DVAE(dvae_cfg), 32, tiny_hf_dir, 0)  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(reference_dvae["encoder"]),
                  jax.tree.leaves(dvae_params["encoder"])):
    np.testing.assert_array_equal(a, np.asarray(b))

  # A model whose sizes differ is refused, naming the leaf.
  other = FlavaModel(reference_model.config.replace(projection_dim=8))
  other_state, _ = train.create_train_state(other, train.make_optimizer({}, 10),
                                            jax.random.key(3), mesh, rules)
  with pytest.raises(ValueError, match=r"init.model_from: image_projection/\w+ has shape"):
    warm_start.initial_params(other_state.params, warm_start.InitConfig(model_from=tiny_hf_dir))


def _workdir_like_the_trainers(root, steps=(2, 4)):
  """checkpoints/STEP/{state, data} as the trainer's CheckpointManager writes them (items "state":
  StandardSave of a sharded train state, "data": grain's iterator state)."""
  import grain  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh({"data": -1})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  saved = {}
  options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False)
  with ocp.CheckpointManager(str(root / warm_start.CHECKPOINT_DIR), options=options) as manager:
    for step in steps:
      params = {"image_encoder": {"w": np.arange(16.0, dtype=np.float32).reshape(8, 2) + step},
                "logit_scale": np.float32(step)}
      state = {"step": jax.device_put(np.int32(step), replicated),
               "params": {"image_encoder": {"w": jax.device_put(params["image_encoder"]["w"],
                                                                  rows)},
                          "logit_scale": jax.device_put(params["logit_scale"], replicated)},
               "opt_state": {"mu": jax.device_put(np.zeros(8, np.float32), rows)}}
      next(iterator)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
      saved[step] = params
  return saved


def test_reading_a_workdirs_parameters_is_quiet_and_exact(tmp_path, caplog):
  saved = _workdir_like_the_trainers(tmp_path)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    params = warm_start.read_workdir_params(str(tmp_path), "init.model_from")
    again = warm_start.read_flava_params(str(tmp_path), "init.model_from")
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  for tree in (params, again):  # the newest step's values, as host arrays of the saved dtypes
    assert jax.tree.structure(tree) == jax.tree.structure(saved[4])
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(saved[4])):
      assert isinstance(got, np.ndarray) and got.dtype == np.asarray(want).dtype
      np.testing.assert_array_equal(got, want)
