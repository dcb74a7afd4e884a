"""Gradient accumulation, frozen parameter groups, and runs started from a transformers checkpoint
or a training workdir."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import flava
from flava_jax import convert, experiment, sharding, train, trainer, warm_start
from flava_jax.data import pipeline
from flava_jax.models.config import DVAEConfig
from flava_jax.tasks import StepContext
from flava_jax.tasks.flava import FlavaTask
from tests.trees import assert_trees_close, assert_trees_equal, matched_leaves


def _text_batch(rows):
  config = flava.get_config("tiny")
  config.global_batch = rows
  config.data.corpora = {"text": config.data.corpora.text.to_dict()}
  data = experiment.make_pipeline(config)
  _, batch = next(data)
  data.close()
  return batch


def test_accumulated_gradients_equal_the_whole_batch_gradients():
  task = experiment.parse(flava.get_config("tiny"))[1]
  params = task.init_params(jax.random.key(0))
  mesh = sharding.make_mesh({"data": -1})
  ctx = StepContext(mesh=mesh, local_batch=1)

  def loss_fn(p, frozen, b, r):
    out = task.loss("text", p, {}, frozen, b, r, ctx)
    return out.loss, (out.metrics, out.extra_update)
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
  (loss, (metrics, _)), grads = whole
  (acc_loss, (acc_metrics, _)), acc_grads = accumulated
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(acc_metrics["mlm"], metrics["mlm"], rtol=1e-5)
  assert float(jnp.abs(jax.tree.leaves(grads["text_encoder"])[0]).sum()) > 0
  assert_trees_close(acc_grads, grads, rtol=1e-4, atol=1e-7)


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
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_from_config(flava.get_config("tiny").sharding.rules)
  dvae_cfg = DVAEConfig.from_dict(dict(convert.dvae_config_from_transformers(
      convert.transformers_io.read_config(tiny_hf_dir)["image_codebook_config"]).to_dict(),
                                       decoder=True))

  def sharded_params(model_config):
    task = FlavaTask({"model": model_config.to_dict(), "dvae": dvae_cfg.to_dict(), "loss": {},
                      "paired_text_length": 16, "text_length": 16})
    shardings = sharding.logical_to_shardings(task.logical_axes(), mesh, rules)
    return task, jax.device_put(task.init_params(jax.random.key(3)), shardings)

  task, initial = sharded_params(reference_model.config)
  sources = {"model_from": tiny_hf_dir}
  params, notes = warm_start.initial_params(initial, sources, task.WARM_STARTS)
  assert notes and "random" not in notes[0]
  assert_trees_equal(params, reference)
  # Shardings are the run's own.
  for path, a, b in matched_leaves(initial, params):
    assert a.sharding == b.sharding, path

  dvae_params = task.init_frozen(0, {"dvae_from": tiny_hf_dir}, ("paired",))
  assert_trees_equal(dvae_params["encoder"], reference_dvae["encoder"])

  # A model whose sizes differ is refused, naming the leaf.
  other_task, other = sharded_params(reference_model.config.replace(projection_dim=8))
  with pytest.raises(ValueError, match=r"init.model_from: image_projection/\w+ has shape"):
    warm_start.initial_params(other, sources, other_task.WARM_STARTS)


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
    assert all(isinstance(got, np.ndarray) for got in jax.tree.leaves(tree))
    assert_trees_equal(tree, saved[4])  # dtypes included


def test_position_embeddings_of_another_grid_are_resized_bicubically():
  """A warm start into a model of another image size resizes the ViT's position embeddings as the
  reference's interpolate_pos_embed does (torch bicubic, align_corners=False, [CLS] kept); any
  other shape difference stays an error naming the leaf."""
  import torch  # pylint: disable=import-outside-toplevel
  from flava_jax import warm_start  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  source = {"vision": {"pos_embed": rng.normal(size=(1 + 4 * 4, 8)).astype(np.float32),
                       "cls_token": rng.normal(size=(8,)).astype(np.float32)}}
  target = {"vision": {"pos_embed": np.zeros((1 + 6 * 6, 8), np.float32),
                       "cls_token": np.zeros((8,), np.float32)}}
  notes = []
  new, count = warm_start.replace_parts(target, source, None, "init.model_from", notes)
  assert count == 2 and notes == ["init.model_from: vision/pos_embed resized from a 4x4 to a 6x6 "
                                  "patch grid (bicubic)"]
  grid = torch.from_numpy(source["vision"]["pos_embed"][1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                             align_corners=False)
  expected = expected.permute(0, 2, 3, 1).reshape(36, 8).numpy()
  got = np.asarray(new["vision"]["pos_embed"])
  np.testing.assert_allclose(got[1:], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[0], source["vision"]["pos_embed"][0])
  wider = {"vision": dict(source["vision"], pos_embed=np.zeros((17, 16), np.float32))}
  with pytest.raises(ValueError, match=r"init\.model_from: vision/pos_embed has shape \(17, 16\)"):
    warm_start.replace_parts(target, wider, None, "init.model_from")
