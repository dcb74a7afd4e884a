"""FLAVA's pretraining as a task: three batch kinds, the frozen dVAE, five objectives.

    paired batch: global contrastive + MMM (image and text) + ITM   (losses/flava.py)
    image batch:  MIM on the image encoder
    text batch:   MLM on the text encoder

Config sections: `model` (models/config.FlavaConfig), `dvae` (the frozen MIM/MMM tokenizer),
`loss` (losses/flava.LossConfig), and the text lengths `paired_text_length` / `text_length`.
`init.model_from`, `init.image_from`, `init.text_from` load parameter groups from other runs;
`init.dvae_from` loads the frozen tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import flops, warm_start
from flava_jax.data import pipeline, transforms
from flava_jax.losses import contrastive
from flava_jax.losses import flava as flava_losses
from flava_jax.models.classifier import FlavaClassifier
from flava_jax.models.config import DVAEConfig, FlavaConfig, dvae_view_size
from flava_jax.models.dvae import DVAE, init_dvae_params, map_pixels
from flava_jax.models.flava import (LOGIT_SCALE_MAX, FlavaModel, abstract_params, init_params,
                                    logical_axes)
from flava_jax.parse import dataclass_from_dict
from flava_jax.tasks import flava_batches
from flava_jax.tasks.base import GradCacheSplit, LossOutput, StepContext, Task, from_boxed

Array = jax.Array

# Leaves that get weight decay: weight matrices, conv kernels and embedding tables. Biases,
# LayerNorm scales, [CLS]/[MASK] tokens and the logit scale do not.
DECAYED_LEAVES = frozenset({"kernel", "qkv_kernel", "out_kernel", "patch_kernel", "word_embed",
                            "position_embed", "token_type_embed", "pos_embed"})


def decays(path: tuple[str, ...]) -> bool:
  """Weight decay for the parameter at `path` (dict keys): its leaf is in DECAYED_LEAVES."""
  return bool(path) and path[-1] in DECAYED_LEAVES


# The parameter groups each batch kind's loss reaches (the others get no AdamW update in that
# step, as PyTorch's AdamW skips parameters whose gradient is None).
GROUPS_BY_KIND = {
    "image": ("image_encoder", "mim_head"),
    "text": ("text_encoder", "mlm_head"),
    "paired": ("image_encoder", "text_encoder", "multimodal_encoder", "image_projection",
               "text_projection", "logit_scale", "mmm_image_head", "mmm_text_head", "itm_head"),
}


def model_pixels(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch with uint8 `pixels` / `dvae_pixels` (as the pipeline ships them: 4x less to
  copy to the device) turned into the models' float inputs (CLIP normalisation; the dVAE's
  pixel map); float inputs pass unchanged. Called inside the jitted step."""
  out = dict(batch)
  if "pixels" in out and out["pixels"].dtype == np.uint8:
    out["pixels"] = transforms.encoder_pixels(out["pixels"])
  if "dvae_pixels" in out and out["dvae_pixels"].dtype == np.uint8:
    out["dvae_pixels"] = map_pixels(out["dvae_pixels"].astype(jnp.float32) / 255.0)
  return out


class FlavaTask(Task):
  """FLAVA pretraining (any subset of the three kinds: the unimodal stages use one)."""

  NAME = "flava"
  SECTIONS = ("model", "dvae", "loss")
  SCALARS = {"paired_text_length": int, "text_length": int}
  WARM_STARTS = {"model_from": None, "image_from": ("image_encoder", "mim_head"),
                 "text_from": ("text_encoder", "mlm_head")}
  FROZEN_STARTS = {"dvae_from": "dVAE"}

  def __init__(self, config: Mapping[str, Any]):
    self.model_config = FlavaConfig.from_dict(config["model"])
    self.dvae_config = DVAEConfig.from_dict(config["dvae"])
    self.loss_config = dataclass_from_dict(flava_losses.LossConfig, config["loss"], "loss")
    self.paired_text_length = config["paired_text_length"]
    self.text_length = config["text_length"]
    for name in ("paired_text_length", "text_length"):
      if getattr(self, name) > self.model_config.text.max_position_embeddings:
        raise ValueError(f"config.{name}={getattr(self, name)} exceeds "
                         "model.text.max_position_embeddings="
                         f"{self.model_config.text.max_position_embeddings}")
    self.model = FlavaModel(self.model_config)
    self.dvae = DVAE(self.dvae_config)
    self.dvae_size = dvae_view_size(self.model_config.image, self.dvae_config)

  def replace(self, **model_changes: Any) -> "FlavaTask":
    """This task with other compute settings (attention_impl, dtype, ...) of the same model."""
    task = object.__new__(type(self))
    task.__dict__.update(self.__dict__)
    task.model_config = self.model_config.replace(**model_changes)
    task.model = FlavaModel(task.model_config)
    return task

  # --- data ---------------------------------------------------------------------------------

  @property
  def kinds(self) -> tuple[str, ...]:
    return flava_losses.BATCH_KINDS

  def check(self, data_cfg: Any) -> None:
    """The heads' prediction slots must hold every label the data pipeline makes."""
    super().check(data_cfg)
    loss, image = self.loss_config, self.model_config.image
    patches = image.num_patches
    masked = min(data_cfg.mask_patches, patches)
    slots = loss.image_prediction_slots
    if slots and not masked <= slots <= patches:
      raise ValueError(f"loss.image_prediction_slots={slots} must be 0 (every patch) or between "
                       f"data.mask_patches={masked} and the {patches} patches of an image")
    for name, length_name in (("paired_text_prediction_slots", "paired_text_length"),
                              ("text_prediction_slots", "text_length")):
      slots, length = getattr(loss, name), getattr(self, length_name)
      if slots > length:
        raise ValueError(f"loss.{name}={slots} exceeds {length_name}={length}")

  def data_shapes(self) -> pipeline.Shapes:
    image, text = self.model_config.image, self.model_config.text
    return pipeline.Shapes(
        image_size=image.image_size, patch_size=image.patch_size, dvae_size=self.dvae_size,
        paired_text_length=self.paired_text_length, text_length=self.text_length,
        text_vocab_size=text.vocab_size, text_pad_id=text.pad_token_id,
        paired_text_predictions=self.loss_config.paired_text_prediction_slots,
        text_predictions=self.loss_config.text_prediction_slots)

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    return pipeline.flava_processors(data_cfg, kinds, self.data_shapes(), train)

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    img, length = self.model_config.image, self.text_length_of(kind)
    spec = {
        # uint8 views, as the data pipeline ships them (the step normalises them)
        "pixels": ((rows, img.image_size, img.image_size, img.num_channels), jnp.uint8),
        "dvae_pixels": ((rows, self.dvae_size, self.dvae_size, self.dvae_config.input_channels),
                        jnp.uint8),
        "patch_mask": ((rows, img.num_patches), jnp.bool_),
        "input_ids": ((rows, length), jnp.int32),
        "input_ids_masked": ((rows, length), jnp.int32),
        "attention_mask": ((rows, length), jnp.int32),
        "mlm_labels": ((rows, length), jnp.int32),
    }
    return {k: jax.ShapeDtypeStruct(*spec[k]) for k in flava_losses.BATCH_KEYS[kind]}

  def text_length_of(self, kind: str) -> int:
    return self.paired_text_length if kind == "paired" else self.text_length

  def batch_shapes(self, data_cfg: Any) -> flava_batches.BatchShapes:
    """The random batches' geometry (the bench and its PyTorch peer)."""
    model, loss = self.model_config, self.loss_config
    return flava_batches.BatchShapes(
        image_size=model.image.image_size, dvae_size=self.dvae_size, grid=model.image.grid_size,
        paired_text_length=self.paired_text_length, text_length=self.text_length,
        text_vocab_size=model.text.vocab_size,
        masked_patches=min(data_cfg.mask_patches, model.image.num_patches),
        mask_min_block=data_cfg.mask_min_block, mlm_rate=data_cfg.mlm_rate,
        paired_text_slots=loss.paired_text_prediction_slots,
        text_slots=loss.text_prediction_slots, itm_negative_rate=loss.itm_negative_rate)

  # --- state --------------------------------------------------------------------------------

  def init_params(self, rng: Array) -> Any:
    return init_params(self.model, rng)

  def logical_axes(self) -> Any:
    return logical_axes(self.model)

  def abstract_params(self) -> tuple[Any, Any]:
    return from_boxed(abstract_params(self.model))

  def _abstract_dvae(self) -> Any:
    abstract = jax.eval_shape(lambda: init_dvae_params(self.dvae, jax.random.key(0),
                                                       image_size=self.dvae_size))
    return {"encoder": abstract["encoder"]}  # FLAVA training reads the codes only

  def init_frozen(self, seed: int, sources: Mapping[str, str], kinds) -> Any:
    """The frozen tokenizer's encoder (init.dvae_from, else random); None for text-only runs
    (the MLM stage never tokenises images)."""
    if not set(kinds) & {"image", "paired"}:
      return None
    source = sources.get("dvae_from", "")
    if not source:
      key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 1)
      return init_dvae_params(self.dvae, key, image_size=self.dvae_size)
    params, _ = warm_start.replace_parts(self._abstract_dvae(),
                                         warm_start.read_dvae_params(source),
                                         ("encoder",), "init.dvae_from")
    return params

  def abstract_frozen(self) -> Any:
    return jax.eval_shape(lambda: init_dvae_params(self.dvae, jax.random.key(0),
                                                   image_size=self.dvae_size))

  def groups_with_gradient(self, kind: str, groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(g for g in groups if g in GROUPS_BY_KIND[kind])

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path)

  # --- the step -----------------------------------------------------------------------------

  def _codes(self, frozen: Any, batch: Mapping[str, Array]) -> Array:
    if frozen is None:
      raise ValueError("image and paired batches need the dVAE for MIM/MMM targets")
    codes = jax.lax.stop_gradient(self.dvae.apply({"params": frozen}, batch["dvae_pixels"],
                                                  method="tokens"))
    if codes.shape[1] != batch["patch_mask"].shape[1]:
      raise ValueError(f"the dVAE gives {codes.shape[1]} codes per image for "
                       f"{batch['patch_mask'].shape[1]} patches: dvae_pixels must be "
                       "(patch grid x 8) pixels wide")
    return codes

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    del extra
    if kind not in flava_losses.BATCH_KINDS:
      raise ValueError(f"batch kind {kind!r} is not one of {flava_losses.BATCH_KINDS}")
    batch = model_pixels(batch)  # uint8 views from the pipeline -> normalised float inputs
    cfg = self.loss_config
    if kind == "paired":
      loss, metrics = flava_losses.paired_loss(self.model, params, batch,
                                               self._codes(frozen, batch), rng, cfg, ctx.mesh,
                                               ctx.local_batch)
    elif kind == "image":
      loss, metrics = flava_losses.image_loss(self.model, params, batch,
                                              self._codes(frozen, batch), cfg)
    else:
      loss, metrics = flava_losses.text_loss(self.model, params, batch, cfg)
    return LossOutput(loss, metrics)

  def after_update(self, params: Any, extra: Any, extra_update: Any) -> tuple[Any, Any]:
    """The reference clamps the learned log temperature to [0, ln 100] before every step."""
    del extra_update
    if "logit_scale" in params:
      params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX))
    return params, extra

  def gradcache(self, kind: str) -> GradCacheSplit | None:
    """The paired kind splits into the global contrastive loss over the whole batch's
    embeddings and the row-decomposable MMM and ITM terms."""
    if kind != "paired":
      return None
    cfg = self.loss_config
    gc_fn = (contrastive.global_contrastive_loss if cfg.contrastive == "global"
             else contrastive.local_contrastive_loss)

    def embed(params, frozen, batch, rng, ctx):
      batch = model_pixels(batch)
      return flava_losses.paired_terms(self.model, params, batch, self._codes(frozen, batch),
                                       rng, cfg, ctx.local_batch)

    def contrast(params, embeddings, ctx):
      loss = gc_fn(embeddings["image"], embeddings["text"],
                   params["logit_scale"].astype(jnp.float32), embeddings["rows"], mesh=ctx.mesh)
      return loss, {"global_contrastive": loss}

    return GradCacheSplit(embed=embed, contrast=contrast,
                          weights={"global_contrastive": cfg.global_contrastive,
                                   "itm": cfg.itm, "mmm_image": cfg.mmm_image,
                                   "mmm_text": cfg.mmm_text})

  # --- figures ------------------------------------------------------------------------------

  def step_flops(self, kind: str, global_batch: int) -> float:
    loss, paired = self.loss_config, kind == "paired"
    return flops.train_step_flops(
        self.model_config, self.dvae_config, kind, global_batch, self.text_length_of(kind),
        loss.image_prediction_slots,
        loss.paired_text_prediction_slots if paired else loss.text_prediction_slots)

  def describe(self, params: Any) -> str:
    return "FLAVA"

  def peer_request(self) -> dict[str, Any]:
    """What the bench's PyTorch peer (tools/peer.py: transformers' FlavaForPreTraining) builds
    its model and random batches from."""
    return dict(family="flava", model=self.model_config.to_dict(),
                dvae=self.dvae_config.to_dict(),
                shapes=self.batch_shapes(self.data_cfg).to_dict())

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return flava_batches.random_batch(kind, rows, self.batch_shapes(self.data_cfg), seed)

  def predict(self) -> "FlavaPredictor":
    return FlavaPredictor(self.model, self.paired_text_length)

  @classmethod
  def for_model(cls, model_config: FlavaConfig) -> "FlavaTask":
    """The task of a model without a training config (a converted or transformers directory):
    the model's own sizes, default objectives, captions of 77 tokens."""
    return cls({"model": model_config.to_dict(), "dvae": {}, "loss": {},
                "paired_text_length": min(77, model_config.text.max_position_embeddings),
                "text_length": model_config.text.max_position_embeddings})


class EncoderSizes:
  """The sizes a predictor reports (evals/features.Predictor), read from `self.model.config`'s
  image and text sections (FlavaConfig's; also the CLIP task's towers)."""

  @property
  def image_size(self) -> int:
    return self.model.config.image.image_size

  @property
  def text_vocab_size(self) -> int:
    return self.model.config.text.vocab_size

  @property
  def max_text_length(self) -> int:
    return self.model.config.text.max_position_embeddings


@dataclasses.dataclass(frozen=True)
class FlavaPredictor(EncoderSizes):
  """What evaluators call on a FLAVA model (evals/features.Predictor)."""

  model: FlavaModel
  text_length: int  # captions' tokens in training

  def logical_axes(self) -> Any:
    return logical_axes(self.model)

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path)

  def image_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": unit-norm projection [B, P], "cls": final-LN h_CLS_I [B, D]}."""
    hidden = self.model.apply({"params": params}, transforms.encoder_pixels(batch["pixels"]),
                              method="encode_image")
    embedding = self.model.apply({"params": params}, hidden, method="project_image")
    return {"embedding": embedding, "cls": hidden[:, 0].astype(jnp.float32)}

  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": [B, P], "cls": final-LN h_CLS_T [B, D]}."""
    hidden = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                              batch.get("token_type_ids"), method="encode_text")
    embedding = self.model.apply({"params": params}, hidden, method="project_text")
    return {"embedding": embedding, "cls": hidden[:, 0].astype(jnp.float32)}

  def multimodal_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"cls": final-LN h_CLS_M [B, D_mm]} of an image and a text."""
    variables = {"params": params}
    image = self.model.apply(variables, transforms.encoder_pixels(batch["pixels"]),
                             method="image_outputs")
    text = self.model.apply(variables, batch["input_ids"], batch["attention_mask"],
                            batch.get("token_type_ids"), method="text_outputs")
    fused = self.model.apply(variables, image.hidden_state, text.hidden_state,
                             batch["attention_mask"], method="encode_multimodal")
    return {"cls": fused[:, 0].astype(jnp.float32)}

  def classifier(self, inputs: str, num_classes: int, hidden_size: int) -> FlavaClassifier:
    """A classification head on h_CLS_I, h_CLS_T or h_CLS_M (fine-tuning), its backbone's
    parameters under "backbone"."""
    return FlavaClassifier(self.model.config, inputs, num_classes, hidden_size)

  def classifier_width(self, inputs: str) -> int:
    config = self.model.config
    return {"image_text": config.multimodal.hidden_size, "image": config.image.hidden_size,
            "text": config.text.hidden_size}[inputs]
