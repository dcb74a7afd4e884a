"""The BLIP task on the seam: its whole step on every mesh equals one device, hard negatives
are mesh-independent with global scope, ITM sees the pairs the reference builds, start-up
checks name their fields, and the bench and AOT tools cover its step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import blip as blip_configs
from flava_jax import experiment, run_once, sharding, train
from flava_jax.data import transforms
from flava_jax.losses import blip as blip_losses
from flava_jax.models.blip import with_first_token
from flava_jax.tasks.base import StepContext
from flava_jax.tools import aot, bench
from tests.trees import assert_metrics_close, assert_trees_close, matched_leaves

BATCH = 16
MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=4, fsdp=2, tensor=1),
          dict(data=2, fsdp=2, tensor=2)]


# Smaller than configs/blip.py:tiny (one layer per stack, 32 px): the same code paths, a
# fraction of the compile time.
SMALL = {"model.image.num_layers": 1, "model.text.num_layers": 1, "model.image.image_size": 32,
         "model.image.hidden_size": 32, "model.text.hidden_size": 32, "model.image.mlp_dim": 64,
         "model.text.mlp_dim": 64, "model.embed_dim": 16}


def _set(config, dotted, value):
  *path, last = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def tiny_config(**loss):
  config = blip_configs.get_config("tiny")
  for key, value in SMALL.items():
    _set(config, key, value)
  config.global_batch = BATCH
  config.loss.queue_size = 2 * BATCH
  config.optimizer.warmup_steps = 0
  config.optimizer.eps = 1e-3  # see tests/test_sharded_step.py: a smooth first Adam update
  config.loss.alpha_ramp_steps = 0
  for key, value in loss.items():
    config.loss[key] = value
  return config


def tiny_experiment(sizes, devices=None, **loss):
  config = tiny_config(**loss)
  config.sharding.mesh = sizes
  return experiment.Experiment(config, devices)


@pytest.fixture(scope="module")
def one_device():
  """The single-device experiment and its initial state as host arrays (the meshes' steps start
  from it: no per-mesh initialisation to compile)."""
  exp = tiny_experiment(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], negatives="global")
  return exp, jax.device_get(exp.create_state(jax.random.key(1)))


def _batch(exp, seed=0):
  return exp.task.random_batch("paired", BATCH, seed)


def test_whole_step_with_global_negatives_matches_one_device_on_every_mesh(one_device):
  """Loss, metrics, parameters, Adam state, momentum copies, queues and pointer after two
  donated steps equal the single-device steps' (1e-5)."""
  exp1, initial = one_device
  batches = [_batch(exp1, seed) for seed in (0, 1)]

  def two_steps(exp):
    state = jax.device_put(initial, exp.state_shardings)
    step = exp.train_step("paired", compiler_options=run_once.compiler_options())
    metrics = []
    for i, batch in enumerate(batches):
      state, m = step(state, exp.frozen(), jax.device_put(batch, sharding.batch_sharding(exp.mesh)),
                      jax.random.key(3 + i))
      metrics.append(jax.device_get(m))
    for path, leaf, want in matched_leaves(state, exp.state_shardings):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
    return jax.device_get(state), metrics

  ref_state, ref_metrics = two_steps(exp1)
  assert int(ref_state.extra["queue_ptr"]) == 0  # two batches of 16 fill the queue of 32
  assert 0.0 < float(ref_metrics[1]["itm"]) and 0.0 < float(ref_metrics[1]["lm"])
  for sizes in MESHES:
    state, metrics = two_steps(tiny_experiment(sizes, negatives="global"))
    for got, want in zip(metrics, ref_metrics):
      assert_metrics_close(got, want, sizes, same_names=False)
    assert_trees_close(state.params, ref_state.params, atol=1e-5, rtol=1e-5)
    assert_trees_close(state.opt_state, ref_state.opt_state, atol=1e-5, rtol=1e-5)
    assert_trees_close(state.extra, ref_state.extra, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes", MESHES)
def test_global_hard_negatives_are_the_same_on_every_mesh(sizes):
  """Sharded over the batch, the draws equal the single-device draws; device-scope draws stay
  inside each shard's rows."""
  rng = np.random.default_rng(0)
  sim_t2i, sim_i2t = rng.normal(size=(2, BATCH, BATCH)).astype(np.float32) * 3
  key = jax.random.key(5)
  want = jax.device_get(blip_losses.hard_negatives(sim_t2i, sim_i2t, key, BATCH))
  mesh = sharding.make_mesh(sizes)
  rows = sharding.batch_sharding(mesh)
  local = BATCH // sharding.data_parallel_size(mesh)
  with jax.set_mesh(mesh):
    draw = jax.jit(blip_losses.hard_negatives, static_argnums=3)
    got = jax.device_get(draw(jax.device_put(sim_t2i, rows), jax.device_put(sim_i2t, rows), key,
                              BATCH))
    local_draws = jax.device_get(draw(jax.device_put(sim_t2i, rows),
                                      jax.device_put(sim_i2t, rows), key, local))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  for neg in local_draws:
    assert np.all(neg // local == np.arange(BATCH) // local)


def test_itm_is_computed_on_the_pairs_the_reference_builds(one_device):
  """The step's ITM loss equals the cross-entropy of the ITM head on (text, image) positives
  followed by (text, negative image) and (negative text, image), drawn the step's way."""
  exp, initial = one_device
  params = initial.params
  task, model = exp.task, exp.task.model
  batch = {k: jnp.asarray(v) for k, v in _batch(exp, 2).items()}
  extra = initial.extra
  rng = jax.random.key(9)
  ctx = StepContext(mesh=None, local_batch=BATCH, step=0)
  # Both sides compiled (much faster than op by op).
  out = jax.jit(lambda p, e, b: task.loss("paired", p, e, None, b, rng, ctx))(params, extra, batch)

  @jax.jit
  def reference_logits(params, extra, batch):
    image = model.image_embeds(params, transforms.encoder_pixels(batch["pixels"]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_feat = model.text_feature(params, model.text_hidden(params, ids, mask))
    _, sim_i2t, sim_t2i = blip_losses.itc_loss(
        model.image_feature(params, image), text_feat, model.image_feature(params, image),
        text_feat, extra["image_queue"], extra["text_queue"], params["temp"], 0.4)
    neg_image, neg_text = blip_losses.hard_negatives(sim_t2i[:, :BATCH], sim_i2t[:, :BATCH],
                                                     rng, BATCH)
    enc = with_first_token(ids, task.model_config.text.enc_token_id)
    positives = model.text_hidden(params, enc, mask, image)
    negatives = model.text_hidden(params, jnp.concatenate([enc, enc[neg_text]]),
                                  jnp.concatenate([mask, mask[neg_text]]),
                                  jnp.concatenate([image[neg_image], image]))
    return model.itm_logits(params, jnp.concatenate([positives, negatives]))

  logits = reference_logits(params, extra, batch)
  labels = jnp.concatenate([jnp.ones(BATCH, jnp.int32), jnp.zeros(2 * BATCH, jnp.int32)])
  want = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(3 * BATCH), labels])
  # Momentum = online at initialisation, so the similarities above are the step's.
  assert abs(float(out.metrics["itm"]) - want) <= 1e-5


def test_a_queue_that_does_not_hold_whole_batches_is_refused_naming_the_field():
  config = tiny_config(queue_size=40)
  with pytest.raises(ValueError, match=r"loss.queue_size=40 is not a multiple of global_batch=16"):
    experiment.parse(config)


def test_a_vocabulary_overlapping_dec_and_enc_is_refused():
  config = tiny_config()
  config.model.text.bos_token_id = 1000
  _, task = experiment.parse(config)
  with pytest.raises(ValueError, match=r"overlaps BLIP's \[DEC\]"):
    task.processors(experiment.parse(config)[0].data, ["paired"])


def test_blip_is_benched_and_compiled_ahead_of_time():
  config = bench.bench_config(tiny_config(), BATCH, 0, 0)
  tool = bench.Bench(config)
  timing = tool.time("paired", BATCH, steps=2, warmup=1)
  assert timing.flops_per_step == tool.exp.step_flops("paired", BATCH) > 0
  reports, shardings = aot.compile_steps(config, aot.tpu_devices("v5p:2x2x1"))
  assert [r.kind for r in reports] == ["paired"]
  assert reports[0].temp_bytes > 0 and reports[0].argument_bytes > 0
  assert set(shardings) == {"vision", "text_encoder", "text_decoder", "vision_proj",
                            "text_proj", "itm_head", "lm_head", "temp"}


def _newest_state(workdir):
  """The newest checkpoint's whole train state (params, optimizer, extra), host arrays."""
  import os  # pylint: disable=import-outside-toplevel
  from flava_jax import warm_start  # pylint: disable=import-outside-toplevel
  step = warm_start.checkpoint_steps(workdir)[0]
  path = os.path.join(workdir, warm_start.CHECKPOINT_DIR, str(step), warm_start.STATE_ITEM)
  return step, warm_start._read_state_item(path)  # pylint: disable=protected-access


def test_momentum_queues_and_pointer_resume_bit_exactly_after_sigkill(tmp_path):
  """Killed after a checkpoint and restarted, the run ends with the momentum parameters, queues,
  queue pointer and parameters of an uninterrupted run, bit for bit."""
  import signal  # pylint: disable=import-outside-toplevel
  from tests.test_resume_process import (  # pylint: disable=import-outside-toplevel
      _finish, _read_until, _resumed_from, _start, _start_uninterrupted, _wait)
  from tests.trees import assert_trees_equal  # pylint: disable=import-outside-toplevel
  steps = 8
  overrides = {"global_batch": 16, "total_steps": steps, "log_every_steps": 1,
               "checkpoint.every_steps": 2, "optimizer.warmup_steps": 2,
               "loss.queue_size": 48,  # 3 batches: the pointer wraps mid-run
               **SMALL}
  # The uninterrupted reference starts after the kill (see _start_uninterrupted).
  workdir = str(tmp_path / "run")
  proc = _start(workdir, config="blip.py", overrides=overrides)
  lines = _read_until(proc, "checkpoint 4 saving")  # so checkpoint 2 is complete
  assert any(line.startswith("BLIP (queue 48, shared decoder) tiny:") for line in lines), lines[:5]
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  uninterrupted = _start_uninterrupted("blip.py", overrides, str(tmp_path / "uninterrupted"))
  out = _finish(workdir, config="blip.py", overrides=overrides)
  _wait(uninterrupted)
  ref_step, reference = _newest_state(str(tmp_path / "uninterrupted"))
  assert 2 <= _resumed_from(out) < steps, out[-2000:]
  step, state = _newest_state(workdir)
  assert step == ref_step == steps
  assert int(state["extra"]["queue_ptr"]) == (steps * 16) % 48
  assert_trees_equal(state["extra"], reference["extra"])
  assert_trees_equal(state["params"], reference["params"])
  assert_trees_equal(state["opt_state"], reference["opt_state"])


def test_base_config_is_the_papers_vit_b_recipe():
  config = blip_configs.get_config("base")
  run, task = experiment.parse(config)
  model, loss = task.model_config, task.loss_config
  assert (model.image.image_size, model.image.patch_size, model.image.layer_norm_eps) == (
      224, 16, 1e-6)
  for enc in (model.image, model.text):
    assert (enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim) == (768, 12, 12, 3072)
  text = model.text
  assert (text.vocab_size, text.bos_token_id, text.enc_token_id, text.sep_token_id) == (
      30524, 30522, 30523, 102)
  assert text.layer_norm_eps == 1e-12 and model.embed_dim == 256 and model.share_decoder
  assert (run.global_batch, task.text_length) == (2880, 30)
  assert (loss.queue_size, loss.momentum, loss.alpha, loss.label_smoothing) == (
      57600, 0.995, 0.4, 0.1)
  assert loss.queue_size % run.global_batch == 0 and loss.negatives == "device"
  epoch = blip_configs.PAPER_PAIRS // 2880
  assert loss.alpha_ramp_steps == 2 * epoch and run.total_steps == 20 * epoch
  opt = run.optimizer
  assert (opt.learning_rate, opt.weight_decay, opt.warmup_steps, opt.decay, opt.decay_rate) == (
      3e-4, 0.05, 3000, "step", 0.9)
  schedule = train.learning_rate_schedule(opt, run.total_steps)
  assert float(schedule(0)) == pytest.approx(1e-6)
  assert float(schedule(3000)) == pytest.approx(3e-4)
  assert float(schedule(3 * epoch + 5)) == pytest.approx(3e-4 * 0.9**3)
  assert float(schedule(run.total_steps * 10)) == pytest.approx(1e-6)  # the floor
  assert run.data.randaugment == (2, 5) and run.data.crop_scale == (0.2, 1.0)
  assert run.data.clean_captions and run.data.caption_max_words == 30


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_every_blip_state_axis_has_a_logical_name_with_a_rule(variant):
  config = blip_configs.get_config(variant)
  _, task = experiment.parse(config)
  ruled = {name for name, _ in config.sharding.rules}
  axes = {"params": task.logical_axes(), "extra": task.extra_logical_axes()}
  shapes = jax.eval_shape(lambda: (lambda p: {"params": p, "extra": task.init_extra(
      jax.random.key(0), p)})(task.init_params(jax.random.key(0))))
  for path, shape, spec in matched_leaves(shapes, axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)):
    assert len(spec) == shape.ndim, path
    assert all(name is None or name in ruled for name in spec), (path, spec)
