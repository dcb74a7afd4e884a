"""Each FLAVA loss equals transformers' FlavaForPreTraining loss on the same weights and inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flava_jax
from flava_jax.losses import flava as flava_losses
from flava_jax.losses.masked import IGNORE_INDEX
from flava_jax.tools import parity
from tests.trees import assert_trees_close

CFG = flava_losses.LossConfig()


def _slots_config(x, cfg=CFG):
  """The heads on the fewest positions that hold every row's labels (the tightest slots)."""
  image = int(np.asarray(x["masked_pos"]).reshape(len(x["ids"]), -1).sum(1).max())
  text = int((x["mlm_labels"] != IGNORE_INDEX).sum(1).max())
  return dataclasses.replace(cfg, image_prediction_slots=image, paired_text_prediction_slots=text,
                             text_prediction_slots=text)


def _configs(x):
  return {"every_position": CFG, "slots": _slots_config(x)}


def _batch(hf_config, itm_labels, seed=0):
  x = parity.random_inputs(hf_config, batch=4, length=10, seed=seed)
  rng = np.random.default_rng(seed + 1)
  chosen = (rng.random(x["ids"].shape) < 0.3) & (x["mask"] == 1)
  chosen[:, 1] = True  # at least one target per row
  mlm_labels = np.where(chosen, x["ids"], IGNORE_INDEX)
  codes = rng.integers(0, hf_config.image_config.vocab_size, x["masked_pos"].shape)
  x.update(mlm_labels=mlm_labels, codes=codes, itm_labels=np.asarray(itm_labels))
  return x


def _reference_losses(hf, x, **kwargs):
  t = {k: torch.tensor(v) for k, v in x.items()}
  with torch.no_grad():
    out = hf(input_ids=t["ids"], input_ids_masked=t["ids_masked"], pixel_values=t["pixels"],
             attention_mask=t["mask"], bool_masked_pos=t["masked_pos"],
             mlm_labels=t["mlm_labels"].clone(), mim_labels=t["codes"].clone(),
             itm_labels=t["itm_labels"], return_loss=True, **kwargs)
  return {k: float(v) for k, v in out.loss_info.items() if v is not None}


def _paired_batch(x):
  return dict(pixels=jnp.asarray(x["pixels"].transpose(0, 2, 3, 1)),
              patch_mask=jnp.asarray(x["masked_pos"]), input_ids=jnp.asarray(x["ids"]),
              input_ids_masked=jnp.asarray(x["ids_masked"]),
              attention_mask=jnp.asarray(x["mask"]), mlm_labels=jnp.asarray(x["mlm_labels"]))


def _ours_paired(model, params, x, cfg=CFG):
  total, metrics = jax.jit(lambda p: flava_losses.paired_loss(
      model, p, _paired_batch(x), jnp.asarray(x["codes"]), jax.random.key(0), cfg,
      itm_labels=jnp.asarray(x["itm_labels"])))(params)
  return float(total), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("itm_labels", [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]],
                         ids=["one_negative", "all_positive", "no_positive"])
def test_paired_losses_match_reference(tiny_hf_pretraining, itm_labels):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  x = _batch(tiny_hf_pretraining.config, itm_labels)
  ref = _reference_losses(tiny_hf_pretraining, x)
  assert set(ref) == {"global_contrastive", "itm", "mmm_image", "mmm_text"}
  for cfg_name, cfg in _configs(x).items():
    total, ours = _ours_paired(model, params, x, cfg)
    for name, value in ref.items():
      assert abs(ours[name] - value) <= 1e-4, (cfg_name, name, ours[name], value)
    assert abs(total - sum(ref.values())) <= 1e-4
    assert ours["itm_negative_fraction"] == pytest.approx(1 - np.mean(itm_labels))
    assert ours.get("mmm_image_overflow", 0) == ours.get("mmm_text_overflow", 0) == 0


def test_unimodal_losses_match_reference(tiny_hf_pretraining):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  x = _batch(tiny_hf_pretraining.config, [1, 1, 1, 1], seed=3)
  t = {k: torch.tensor(v) for k, v in x.items()}
  with torch.no_grad():
    mim_ref = tiny_hf_pretraining(pixel_values=t["pixels"], bool_masked_pos=t["masked_pos"],
                                  mim_labels=t["codes"].clone(), return_loss=True).loss_info.mim
    mlm_ref = tiny_hf_pretraining(input_ids_masked=t["ids_masked"], attention_mask=t["mask"],
                                  mlm_labels=t["mlm_labels"].clone(),
                                  return_loss=True).loss_info.mlm
  image_batch = dict(pixels=jnp.asarray(x["pixels"].transpose(0, 2, 3, 1)),
                     patch_mask=jnp.asarray(x["masked_pos"]))
  text_batch = dict(input_ids_masked=jnp.asarray(x["ids_masked"]),
                    attention_mask=jnp.asarray(x["mask"]), mlm_labels=jnp.asarray(x["mlm_labels"]))
  for cfg in _configs(x).values():
    mim, metrics = flava_losses.image_loss(model, params, image_batch, jnp.asarray(x["codes"]),
                                           cfg)
    assert abs(float(mim) - float(mim_ref)) <= 1e-4
    assert int(metrics["mim_tokens"]) == int(x["masked_pos"].sum())
    mlm, _ = flava_losses.text_loss(model, params, text_batch, cfg)
    assert abs(float(mlm) - float(mlm_ref)) <= 1e-4


def test_prediction_slots_give_the_same_gradients_and_count_overflow(tiny_hf_pretraining):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  x = _batch(tiny_hf_pretraining.config, [1, 0, 1, 1], seed=5)
  slots = _slots_config(x)

  def grads(cfg):
    return jax.jit(jax.grad(lambda p: flava_losses.paired_loss(  # compiled: faster than eager
        model, p, _paired_batch(x), jnp.asarray(x["codes"]), jax.random.key(0), cfg,
        itm_labels=jnp.asarray(x["itm_labels"]))[0]))(params)

  full, gathered = grads(CFG), grads(slots)
  assert_trees_close(gathered, full, atol=1e-6, rtol=1e-5)
  # One slot fewer than the fullest row needs: its last label is left out and counted.
  cap = slots.paired_text_prediction_slots - 1
  _, metrics = _ours_paired(model, params, x,
                            dataclasses.replace(slots, paired_text_prediction_slots=cap))
  overflow = np.maximum((x["mlm_labels"] != IGNORE_INDEX).sum(1) - cap, 0)
  assert metrics["mmm_text_overflow"] == overflow.sum() > 0


def test_loss_weights_scale_the_total(tiny_hf_pretraining):
  model, params = flava_jax.from_transformers(tiny_hf_pretraining)
  x = _batch(tiny_hf_pretraining.config, [1, 0, 1, 1])
  _, parts = _ours_paired(model, params, x)
  cfg = flava_losses.LossConfig(global_contrastive=2.0, itm=0.0, mmm_image=0.5, mmm_text=1.0)
  total, _ = flava_losses.paired_loss(model, params, _paired_batch(x), jnp.asarray(x["codes"]),
                                      jax.random.key(0), cfg,
                                      itm_labels=jnp.asarray(x["itm_labels"]))
  expected = 2 * parts["global_contrastive"] + 0.5 * parts["mmm_image"] + parts["mmm_text"]
  assert float(total) == pytest.approx(expected, abs=1e-5)
