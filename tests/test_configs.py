"""Configs: the variants build, wrong fields fail by name, every axis has a logical name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import flava_jax
from configs import flava as flava_configs
from flava_jax import run_once
from flava_jax.models.dvae import init_dvae_params
from tests.flag_parsing import parse_config_flags
from tests.trees import assert_trees_close, matched_leaves


def test_full_config_has_the_flava_full_numbers():
  config = flava_jax.FlavaConfig.from_dict(flava_configs.get_config("full").model)
  img, txt, mm = config.image, config.text, config.multimodal
  assert (img.image_size, img.patch_size, img.num_patches) == (224, 16, 196)
  for enc in (img, txt):
    assert (enc.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim) == (768, 12, 12, 3072)
    assert enc.layer_norm_eps == 1e-12 and enc.qkv_bias
  assert (mm.hidden_size, mm.num_layers) == (768, 6)
  assert (txt.vocab_size, txt.max_position_embeddings, txt.type_vocab_size) == (30522, 512, 2)
  assert img.vocab_size == 8192 and config.projection_dim == 768
  assert config.logit_scale_init == pytest.approx(np.log(1 / 0.07), abs=1e-4)
  dvae = flava_jax.DVAEConfig.from_dict(flava_configs.get_config("full").dvae)
  assert (dvae.hidden_size, dvae.vocab_size, dvae.blocks_per_group) == (256, 8192, 2)


def test_default_variant_is_tiny():
  assert flava_configs.get_config().variant == "tiny"
  tiny = flava_jax.FlavaConfig.from_dict(flava_configs.get_config("tiny").model)
  assert tiny.image.num_layers <= 2 and tiny.image.hidden_size <= 64
  with pytest.raises(ValueError, match="unknown model variant"):
    flava_configs.get_config("huge")


@pytest.mark.parametrize("change, error, match", [
    ({"image": {"hiden_size": 3}}, ValueError, r"model\.image\.hiden_size"),
    ({"projection": 3}, ValueError, r"model\.projection"),
    ({"text": {"num_layers": "12"}}, TypeError, r"model\.text\.num_layers"),
    ({"pretraining_heads": 1}, TypeError, r"model\.pretraining_heads"),
    ({"attention_impl": "flash"}, ValueError, r"model\.attention_impl"),
    ({"remat_policy": "some"}, ValueError, r"model\.remat_policy"),
    ({"scan_unroll": 0}, ValueError, r"model\.scan_unroll"),
    ({"multimodal": {"num_heads": 5}}, ValueError, r"model\.multimodal\.hidden_size"),
    ({"image": {"image_size": 100}}, ValueError, r"model\.image\.image_size"),
])
def test_bad_fields_are_named(change, error, match):
  values = flava_configs.get_config("tiny").model.to_dict()
  for key, value in change.items():
    if isinstance(value, dict) and isinstance(values.get(key), dict):
      values[key] = {**values[key], **value}
    else:
      values[key] = value
  with pytest.raises(error, match=match):
    flava_jax.FlavaConfig.from_dict(values)


def test_dvae_config_errors_are_named():
  with pytest.raises(ValueError, match=r"dvae\.num_groups"):
    flava_jax.DVAEConfig.from_dict({"num_groups": 3})
  with pytest.raises(ValueError, match=r"dvae\.width"):
    flava_jax.DVAEConfig.from_dict({"width": 3})


def _rule_names(config):
  return {name for name, _ in config.sharding.rules}


@pytest.mark.parametrize("variant", ["tiny", "full"])
def test_every_parameter_axis_has_a_logical_name_with_a_rule(variant):
  config = flava_configs.get_config(variant)
  model = flava_jax.FlavaModel(flava_jax.FlavaConfig.from_dict(config.model))
  specs = flava_jax.logical_axes(model)
  shapes = jax.eval_shape(lambda: flava_jax.init_params(model, jax.random.key(0)))
  names = set()
  for path, spec, shape in matched_leaves(
      specs, shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
      or type(x).__name__ == "PartitionSpec"):
    assert len(spec) == len(shape.shape), (path, spec, shape.shape)
    assert all(name is not None for name in spec), path
    names.update(spec)
  assert names <= _rule_names(config), names - _rule_names(config)
  assert {"embed", "mlp", "heads", "vocab", "layers"} <= names

  dvae = flava_jax.DVAE(flava_jax.DVAEConfig.from_dict(config.dvae))
  boxed = jax.eval_shape(lambda: init_dvae_params(dvae, jax.random.key(0), boxed=True))
  for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(boxed)):
    assert all(name in _rule_names(config) for name in spec), spec


def test_model_runs_sharded_by_the_config_rules():
  """Parameters and activations sharded over an 8-device (data, fsdp, tensor) mesh by the
  logical rules give the single-device result."""
  config = flava_configs.get_config("tiny")
  model = flava_jax.FlavaModel(flava_jax.FlavaConfig.from_dict(config.model))
  params = flava_jax.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(8, 64, 64, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 1024, size=(8, 16)))
  mask = jnp.asarray(np.arange(16)[None] < rng.integers(3, 17, size=(8, 1)))

  def forward(p, pixels, ids, mask):
    out = model.apply({"params": p}, pixels, ids, mask)
    return out.image_embedding, out.text_embedding, out.itm_logits, out.mmm_text_logits

  expected = jax.jit(forward)(params, pixels, ids, mask)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = [tuple(r) for r in config.sharding.rules]
  shardings = nn.logical_to_mesh_sharding(flava_jax.logical_axes(model), mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  qkv = sharded_params["text_encoder"]["encoder"]["layers"]["attention"]["qkv_kernel"]
  assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(forward)(sharded_params, *(jax.device_put(x, batch) for x in (pixels, ids, mask)))
  assert_trees_close(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def compile_options_case():
  # A loop over layers (the full config's form; tiny itself is unrolled) against the options.
  base = flava_jax.FlavaConfig.from_dict(flava_configs.get_config("tiny").model).replace(
      scan_unroll=1)
  params = flava_jax.init_params(flava_jax.FlavaModel(base), jax.random.key(0))
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 1024, size=(2, 8)))

  def loss(config):
    model = flava_jax.FlavaModel(config)
    def f(p):
      out = model.apply({"params": p}, pixels, ids, jnp.ones_like(ids))
      return jnp.sum(out.mmm_text_logits ** 2) + jnp.sum(out.image_embedding * out.text_embedding)
    # XLA's optimised CPU backend, as runs compile (conftest turns LLVM's optimisation off for
    # the session): without it the recomputed forward of a remat policy rounds differently.
    return jax.jit(jax.value_and_grad(f), compiler_options=run_once.OPTIMISED_CPU_OPTIONS)(params)

  return base, loss, loss(base)


@pytest.mark.parametrize("change", [dict(scan_unroll=2), dict(remat_policy="full"),
                                    dict(remat_policy="dots_no_batch")])
def test_compilation_options_do_not_change_the_numbers(change, compile_options_case):
  """Unrolled layer stacks and rematerialisation compute the same function and gradients."""
  base, loss, (ref_value, ref_grads) = compile_options_case
  value, grads = loss(base.replace(**change))
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  assert_trees_close(grads, ref_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("field, value, match", [
    ("image_prediction_slots", 5, r"loss\.image_prediction_slots=5 .*data\.mask_patches=6"),
    ("image_prediction_slots", 17, r"loss\.image_prediction_slots=17 .*16 patches"),
    ("paired_text_prediction_slots", 17, r"loss\.paired_text_prediction_slots=17 exceeds"),
    ("text_prediction_slots", -1, r"loss\.text_prediction_slots=-1 must be >= 0"),
])
def test_prediction_slots_that_cannot_hold_the_labels_fail_at_start_up(field, value, match):
  from flava_jax import trainer  # pylint: disable=import-outside-toplevel
  config = flava_configs.get_config("tiny")
  config.loss[field] = value
  with pytest.raises(ValueError, match=match):
    trainer.check_config(config)


# --- data sections on the command line ---------------------------------------------------------

_CONFIG_FILES = ([("flava.py", v) for v in ("tiny", "full")]
                 + [(f, None) for f in ("mim.py", "mlm.py", "dvae.py", "clip.py")]
                 + [("eval/retrieval.py", v) for v in ("embedded", "coco")]
                 + [("eval/zero_shot.py", v) for v in ("embedded", "imagenet", "cifar10")]
                 + [("eval/linear_probe.py", v) for v in ("embedded", "imagenet", "cifar10")]
                 + [("eval/finetune.py", v) for v in ("text_pairs", "vqa", "ve", "rte", "sst2")])


def _data_sections(node, prefix=""):
  """Paths of every mapping under `node` that names a source (a data section)."""
  out = []
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      path = f"{prefix}{key}"
      out += [path] if "source" in value else _data_sections(value, path + ".")
  return out


def _get(config, path):
  for key in path.split("."):
    config = config[key]
  return config


@pytest.mark.parametrize("name, variant", _CONFIG_FILES)
def test_every_data_section_can_be_pointed_at_own_shards_on_the_command_line(name, variant):
  """--config.SECTION.source=array_record --config.SECTION.paths=DIR (and the other source
  fields) parse for every split of every config, and what they give is a valid source."""
  from flava_jax import evals  # pylint: disable=import-outside-toplevel
  from flava_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from flava_jax.evals import features  # pylint: disable=import-outside-toplevel
  path = name + (f":{variant}" if variant else "")
  sections = _data_sections(parse_config_flags(path))
  expected = {"flava.py": 5, "mim.py": 1, "mlm.py": 1, "dvae.py": 3, "clip.py": 2,
              "eval/retrieval.py": 1,
              "eval/zero_shot.py": 1, "eval/linear_probe.py": 3, "eval/finetune.py": 2}[name]
  assert len(sections) == expected, sections
  overrides = []
  for i, section in enumerate(sections):
    overrides += [f"--config.{section}.source=array_record",
                  f"--config.{section}.paths=/shards/{i}",
                  f"--config.{section}.data_dir=/tfds/{i}",
                  f"--config.{section}.fields.caption=caption_{i}"]
  config = parse_config_flags(path, *overrides)
  for i, section in enumerate(sections):
    values = _get(config, section)
    assert (values.source, values.paths, values.data_dir) == ("array_record", f"/shards/{i}",
                                                              f"/tfds/{i}")
    assert values.fields.caption == f"caption_{i}"
    # A training corpus reads image, caption, text and label; an evaluation split any of them.
    corpus = ".corpora." in f".{section}"
    wanted = ("image", "caption", "text", "label") if corpus else sources.CANONICAL_FIELDS
    assert set(wanted) <= set(values.fields), (section, values.fields)
    if not corpus:
      cfg = features.source_config(values, section)  # every field is a SourceConfig field
      assert cfg.paths == f"/shards/{i}" and cfg.fields["caption"] == f"caption_{i}"
  if "data" in config and "corpora" in config.data:
    _, corpora = pipeline.data_config(config.data)
    assert all(c.source == "array_record" and c.paths.startswith("/shards/")
               for c in corpora.values())
  evaluation = "task" in config and not isinstance(config.task, str)  # a training config's
  for name_, task in ({"task": config.task} if evaluation else   # task is the model family's
                      dict(config.get("evals", {}))).items():
    evals.parse(task, name_)


def test_eval_configs_name_the_canonical_fields_of_the_sources():
  from configs.eval import base  # pylint: disable=import-outside-toplevel
  from flava_jax.data import sources  # pylint: disable=import-outside-toplevel
  assert base.CANONICAL_FIELDS == sources.CANONICAL_FIELDS
