"""BLIP's pretraining as a task: ITC with momentum distillation and queues, ITM with hard
negatives, and the captioning LM, on the MED model (models/blip.py, losses/blip.py).

    python -m flava_jax.main --config=configs/blip.py --workdir=/tmp/blip

One batch kind, paired: pixels (uint8), input_ids and attention_mask ([CLS] text [SEP], padded).
Per step (the reference's order; loss = itc + itm + lm with the `loss` weights):
  1. online image tokens and [CLS] features; unimodal text [CLS] features;
  2. the momentum encoders' features (no gradient) and ITC against them and the queues, with
     soft targets weighted by alpha, ramped from 0 to loss.alpha over loss.alpha_ramp_steps;
  3. one hard negative image per text and one negative text per image, drawn from the softmax of
     the online similarities within each device's rows (loss.negatives="device", the reference
     pretraining) or within the global batch ("global", its retrieval fine-tuning); ITM on
     [ENC] of the 3B pairs (positives, text + negative image, negative text + image);
  4. the decoder's LM loss on [DEC] + the caption, label smoothing loss.label_smoothing.
After the optimizer update (`after_update`): the temperature is clamped to [0.001, 0.5], the
momentum parameters move towards the new online ones (rate loss.momentum), and the batch's
momentum features replace the queues' oldest rows. The reference does the clamp and the
momentum update at the start of the next step, on the same values: the results are the same, and
a checkpoint holds the momentum parameters the next step reads.

Extra state (saved and restored with the parameters): momentum copies of vision, vision_proj,
text_encoder (without its cross-attention, which the unimodal mode never reads) and text_proj;
image_queue and text_queue [queue_size, embed_dim]; queue_ptr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from flava_jax import flops
from flava_jax.data import pipeline, transforms
from flava_jax.losses import blip as blip_losses
from flava_jax.models import blip_generate
from flava_jax.models.blip import (
    MOMENTUM_PARTS, Blip, BlipConfig, l2_normalize, unimodal_text, with_first_token)
from flava_jax.parse import check_choice, dataclass_from_dict
from flava_jax.tasks.base import LossOutput, StepContext, Task, from_boxed
from flava_jax.tasks.flava import EncoderSizes  # image_size, text_vocab_size, max_text_length

Array = jax.Array

TEMP_RANGE = (0.001, 0.5)  # the reference clamps its temperature to this before every step
NEGATIVE_SCOPES = ("device", "global")


@dataclasses.dataclass(frozen=True)
class BlipLossConfig:
  """BLIP's objectives (config.loss)."""

  itc: float = 1.0
  itm: float = 1.0
  lm: float = 1.0
  queue_size: int = 57600
  momentum: float = 0.995
  alpha: float = 0.4
  # alpha = loss.alpha * min(1, step / alpha_ramp_steps): the reference ramps it over the first
  # two epochs (set this to 2 * steps per epoch); 0 = no ramp.
  alpha_ramp_steps: int = 0
  negatives: str = "device"  # hard negatives from each device's rows, or the global batch
  label_smoothing: float = 0.1
  # Captioning fine-tuning (configs/blip.py:captioner): prepended to every caption after
  # cleaning; its tokens are not LM targets. An objective of weight 0 is not computed at all.
  prompt: str = ""

  def validate(self) -> "BlipLossConfig":
    check_choice("loss.negatives", self.negatives, NEGATIVE_SCOPES)
    if self.queue_size <= 0:
      raise ValueError(f"loss.queue_size must be positive, got {self.queue_size}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"loss.momentum must be in [0, 1), got {self.momentum}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.alpha_ramp_steps < 0:
      raise ValueError(f"loss.alpha_ramp_steps must be >= 0, got {self.alpha_ramp_steps}")
    return self


def random_pairs(model_config: BlipConfig, length: int, rows: int, seed: int = 0
                 ) -> dict[str, np.ndarray]:
  """Random pixels and captions of random lengths: [CLS] ids [SEP] then padding (the bench's
  batches, ours and the PyTorch peer's)."""
  rng, size, text = np.random.default_rng(seed), model_config.image.image_size, model_config.text
  words = rng.integers(5, min(text.bos_token_id, text.enc_token_id), (rows, length))
  used = rng.integers(3, length + 1, rows)
  position = np.arange(length)[None]
  ids = np.where(position < used[:, None] - 1, words, text.pad_token_id)
  ids[:, 0] = 2 if text.sep_token_id != 2 else 1  # some [CLS]-like id
  ids[np.arange(rows), used - 1] = text.sep_token_id
  return {"pixels": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
          "input_ids": ids.astype(np.int32),
          "attention_mask": (position < used[:, None]).astype(np.int32)}


def decays(path: tuple[str, ...]) -> bool:
  """Every parameter gets weight decay: the reference's AdamW takes model.parameters() whole."""
  del path
  return True


class BlipTask(Task):
  """BLIP pretraining (ITC + ITM + LM) on image-caption pairs."""

  NAME = "blip"
  SECTIONS = ("model", "loss")
  SCALARS = {"text_length": int}
  WARM_STARTS = {"model_from": None}

  def __init__(self, config: Mapping[str, Any]):
    self.model_config = BlipConfig.from_dict(config["model"])
    self.loss_config = dataclass_from_dict(BlipLossConfig, config.get("loss", {}),
                                           "loss").validate()
    self.text_length = config["text_length"]
    text = self.model_config.text
    if not 2 <= self.text_length <= text.max_position_embeddings:
      raise ValueError(f"config.text_length={self.text_length} must be in [2, "
                       f"model.text.max_position_embeddings={text.max_position_embeddings}]")
    global_batch = config.get("global_batch")
    if isinstance(global_batch, int) and global_batch > 0:
      # Each step enqueues the whole global batch: the queue must hold whole batches, or the
      # write at the pointer would run past its end (salesforce/BLIP issue 101).
      if self.loss_config.queue_size % global_batch:
        raise ValueError(
            f"loss.queue_size={self.loss_config.queue_size} is not a multiple of "
            f"global_batch={global_batch}: every step enqueues the global batch's features")
    self.model = Blip(self.model_config)
    self.prompt_tokens = 0  # the prompt's tokens in every caption (loss.prompt)
    if self.loss_config.prompt:
      data_cfg, _ = pipeline.data_config(config.get("data") or {})
      ids, mask, _ = pipeline.load_tokenizer(data_cfg).encode(self.loss_config.prompt,
                                                              self.text_length)
      self.prompt_tokens = int(mask.sum()) - 2  # without [CLS] and [SEP]
      if self.prompt_tokens < 1 or self.prompt_tokens > self.text_length - 3:
        raise ValueError(f"loss.prompt={self.loss_config.prompt!r} is {self.prompt_tokens} "
                         f"tokens: it must leave room in text_length={self.text_length}")
      del ids

  @classmethod
  def for_model(cls, model_config: BlipConfig) -> "BlipTask":
    """The task of a model without a training config (a converted directory): its own sizes,
    the default objectives, captions of 30 tokens (fewer if its positions are fewer)."""
    return cls({"model": model_config.to_dict(), "loss": {},
                "text_length": min(30, model_config.text.max_position_embeddings)})

  def check(self, data_cfg: Any) -> None:
    """Pretraining needs every part of the MED (a converted model may hold only some)."""
    super().check(data_cfg)
    for part in ("with_encoder", "with_decoder"):
      if not getattr(self.model_config, part):
        raise ValueError(f"model.{part}=False: BLIP pretraining trains the text encoder (ITC, "
                         "ITM) and the decoder (LM); this model lacks one of them")

  def replace(self, **model_changes: Any) -> "BlipTask":
    """The same task with model fields changed (e.g. attention_impl)."""
    new = object.__new__(BlipTask)
    new.__dict__.update(self.__dict__)
    new.model_config = dataclasses.replace(self.model_config, **model_changes).validate()
    new.model = Blip(new.model_config)
    return new

  # --- data ---------------------------------------------------------------------------------

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("paired",)

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    """BLIP's image-caption processor: random resized crop, flip and RandAugment per the data
    settings, captions cleaned and cut (data.clean_captions, data.caption_max_words)."""
    tok = pipeline.load_tokenizer(data_cfg)
    self.check_tokenizer(tok, "data.vocab_file")
    return {k: pipeline.image_text_processor(data_cfg, self.model_config.image.image_size, tok,
                                             self.text_length, train, self.loss_config.prompt)
            for k in kinds}

  def check_tokenizer(self, tok: Any, field: str) -> None:
    """The vocabulary must leave BLIP's [DEC] and [ENC] ids free and agree on [PAD] and [SEP]."""
    text = self.model_config.text
    if tok.vocab_size > min(text.bos_token_id, text.enc_token_id):
      raise ValueError(
          f"{field}: the vocabulary has {tok.vocab_size} tokens, which overlaps BLIP's [DEC] "
          f"(model.text.bos_token_id={text.bos_token_id}) or [ENC] (model.text.enc_token_id="
          f"{text.enc_token_id}); they must be ids past the vocabulary")
    for name, ours, theirs in (("pad_token_id", text.pad_token_id, tok.pad_id),
                               ("sep_token_id", text.sep_token_id, tok.sep_id)):
      if ours != theirs:
        raise ValueError(f"{field}: the vocabulary's {'[PAD]' if 'pad' in name else '[SEP]'} is "
                         f"id {theirs} but model.text.{name} is {ours}")

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, length = self.model_config.image.image_size, self.text_length
    return {"pixels": jax.ShapeDtypeStruct((rows, size, size, 3), jnp.uint8),
            "input_ids": jax.ShapeDtypeStruct((rows, length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((rows, length), jnp.int32)}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return random_pairs(self.model_config, self.text_length, rows, seed)

  def peer_request(self) -> dict[str, Any]:
    """What the bench's PyTorch peer (tools/peer_blip.py: transformers' BLIP modules in the
    reference's pretraining step) builds its model and random batches from."""
    return dict(family="blip", model=self.model_config.to_dict(), text_length=self.text_length,
                loss=dataclasses.asdict(self.loss_config))

  # --- state --------------------------------------------------------------------------------

  def init_params(self, rng: Array) -> Any:
    return self.model.init_params(rng)

  def logical_axes(self) -> Any:
    return self.model.logical_axes()

  def abstract_params(self) -> tuple[Any, Any]:
    return from_boxed(self.model.abstract_params())

  def init_extra(self, rng: Array, params: Any) -> Any:
    """Momentum copies equal to the parameters; queues of random unit vectors; pointer 0."""
    embed, size = self.model_config.embed_dim, self.loss_config.queue_size
    image_rng, text_rng = jax.random.split(rng)
    queue = lambda r: l2_normalize(jax.random.normal(r, (size, embed), jnp.float32))  # noqa: E731
    return {"momentum": momentum_parts(params),
            "image_queue": queue(image_rng), "text_queue": queue(text_rng),
            "queue_ptr": jnp.zeros((), jnp.int32)}

  def extra_logical_axes(self) -> Any:
    return {"momentum": momentum_parts(self.logical_axes()),
            "image_queue": P(None, None), "text_queue": P(None, None), "queue_ptr": P()}

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path)

  def warm_started(self, params: Any, extra: Any) -> Any:
    """Momentum copies of the loaded parameters (fresh buffers, the old copies' shardings), as
    the reference's fine-tuning starts its momentum encoders from the pretrained ones; the
    queues stay as initialised."""
    old = extra["momentum"]
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                   out_shardings=jax.tree.map(lambda x: x.sharding, old))
    return dict(extra, momentum=copy(momentum_parts(params)))

  # --- the step -----------------------------------------------------------------------------

  def alpha(self, step: Array) -> Array:
    cfg = self.loss_config
    if not cfg.alpha_ramp_steps:
      return jnp.asarray(cfg.alpha, jnp.float32)
    return cfg.alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.alpha_ramp_steps)

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    cfg, text_cfg, model = self.loss_config, self.model_config.text, self.model
    pixels = transforms.encoder_pixels(batch["pixels"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ids.shape[0]

    image = model.image_embeds(params, pixels)  # [B, 1+P, D_v]
    zero = jnp.zeros((), jnp.float32)
    itc = itm = itm_accuracy = lm = zero
    tokens = jnp.zeros((), jnp.int32)
    alpha, extra_update = self.alpha(ctx.step), None
    if cfg.itc or cfg.itm:
      image_feat = model.image_feature(params, image)
      text_feat = model.text_feature(params, model.text_hidden(params, ids, mask))
      momentum = jax.lax.stop_gradient(dict(params, **extra["momentum"]))
      image_feat_m = model.image_feature(momentum, model.image_embeds(momentum, pixels))
      text_feat_m = model.text_feature(momentum, model.text_hidden(momentum, ids, mask))
      image_feat_m, text_feat_m = jax.lax.stop_gradient((image_feat_m, text_feat_m))
      itc, sim_i2t, sim_t2i = blip_losses.itc_loss(
          image_feat, text_feat, image_feat_m, text_feat_m, extra["image_queue"],
          extra["text_queue"], params["temp"], alpha)
      extra_update = {"image_feat": image_feat_m, "text_feat": text_feat_m}
    if cfg.itm:
      block = ctx.local_batch if cfg.negatives == "device" else rows
      if block < 2:
        raise ValueError(f"loss.negatives='device' draws hard negatives among each device's rows,"
                         f" and this mesh gives a device {block} row of the batch of {rows}: "
                         "raise global_batch or set loss.negatives='global'")
      neg_image, neg_text = blip_losses.hard_negatives(sim_t2i[:, :rows], sim_i2t[:, :rows],
                                                       rng, block)
      enc_ids = with_first_token(ids, text_cfg.enc_token_id)
      # The 3B pairs, interleaved per row (row b's three stay on b's device): (text, its image),
      # (text, negative image), (negative text, image); labels 1, 0, 0.
      three = lambda a, b, c: jnp.stack([a, b, c], axis=1).reshape(rows * 3, *a.shape[1:])  # noqa: E731
      pair_ids = three(enc_ids, enc_ids, blip_losses.take_rows(enc_ids, neg_text, block))
      pair_mask = three(mask, mask, blip_losses.take_rows(mask, neg_text, block))
      pair_image = three(image, blip_losses.take_rows(image, neg_image, block), image)
      fused = model.text_hidden(params, pair_ids, pair_mask, pair_image)
      labels = jnp.tile(jnp.asarray([1, 0, 0], jnp.int32), rows)
      itm, itm_accuracy = blip_losses.itm_loss(model.itm_logits(params, fused), labels)
    if cfg.lm:
      dec_ids = with_first_token(ids, text_cfg.bos_token_id)
      logits = model.decoder_logits(params, dec_ids, mask, image)
      # [DEC] and the prompt's tokens are not targets (the reference's prompt_length).
      targets = blip_losses.lm_targets(dec_ids, mask,
                                       1 + self.prompt_tokens if self.prompt_tokens else 0)
      lm, tokens = blip_losses.lm_loss(logits, targets, cfg.label_smoothing)

    loss = cfg.itc * itc + cfg.itm * itm + cfg.lm * lm
    metrics = {"itc": itc, "itm": itm, "lm": lm, "itm_accuracy": itm_accuracy,
               "temp": params["temp"], "alpha": alpha, "lm_tokens": tokens.astype(jnp.float32)}
    return LossOutput(loss, metrics, extra_update)

  def after_update(self, params: Any, extra: Any, extra_update: Any) -> tuple[Any, Any]:
    params = dict(params, temp=jnp.clip(params["temp"], *TEMP_RANGE))
    rate = self.loss_config.momentum
    momentum = blip_losses.momentum_update(extra["momentum"], momentum_parts(params), rate)
    extra = dict(extra, momentum=momentum)
    if extra_update is not None:
      image_queue, pointer = blip_losses.enqueue(extra["image_queue"], extra["queue_ptr"],
                                                 extra_update["image_feat"])
      text_queue, _ = blip_losses.enqueue(extra["text_queue"], extra["queue_ptr"],
                                          extra_update["text_feat"])
      extra = dict(extra, image_queue=image_queue, text_queue=text_queue, queue_ptr=pointer)
    return params, extra

  # --- figures ------------------------------------------------------------------------------

  def step_flops(self, kind: str, global_batch: int) -> float:
    cfg, length = self.model_config, self.text_length
    img, text = cfg.image, cfg.text
    vision = (2 * img.num_patches * img.patch_size**2 * img.num_channels * img.hidden_size
              + flops.encoder_flops(img, img.num_patches + 1))
    unimodal = flops.encoder_flops(text, length)
    # Cross-attention per layer: queries and output (2 T D^2 each), keys/values of the image
    # tokens (2 * 2 S D_v D), scores and weighted values (2 * 2 T S D).
    tokens = img.num_patches + 1
    cross = text.num_layers * (4 * length * text.hidden_size**2
                               + 4 * tokens * img.hidden_size * text.hidden_size
                               + 4 * length * tokens * text.hidden_size)
    grounded = unimodal + cross
    lm_head = flops.head_flops(text.hidden_size, text.vocab_size, length)
    projections = 2 * (img.hidden_size + text.hidden_size) * cfg.embed_dim
    trained = vision + unimodal + 3 * grounded + grounded + lm_head + projections
    momentum = vision + unimodal + projections  # forward only
    columns = global_batch + self.loss_config.queue_size
    similarities = 2 * 2 * 2 * columns * cfg.embed_dim  # online (fwd + bwd ~ 3x) and momentum
    return global_batch * (3 * trained + momentum + 2 * similarities)

  def describe(self, params: Any) -> str:
    return (f"BLIP (queue {self.loss_config.queue_size}, "
            f"{'shared' if self.model_config.share_decoder else 'separate'} decoder)")

  # --- evaluators ---------------------------------------------------------------------------

  def predict(self) -> "BlipPredictor":
    return BlipPredictor(self.model, self.text_length)


def momentum_parts(tree: Mapping[str, Any]) -> dict[str, Any]:
  """The parts the momentum encoders copy, from a parameter tree (or its logical axes)."""
  parts = {name: tree[name] for name in MOMENTUM_PARTS}
  parts["text_encoder"] = unimodal_text(parts["text_encoder"])
  return parts


@dataclasses.dataclass(frozen=True)
class BlipPredictor(EncoderSizes):
  """What evaluators call: ITC features of images and texts (retrieval, zero-shot, probes)."""

  model: Blip
  text_length: int

  @property
  def tokenizer_vocab_size(self) -> int:
    """The text vocabulary without BLIP's [DEC] and [ENC] (the tokenizer's size)."""
    text = self.model.config.text
    return min(text.bos_token_id, text.enc_token_id)

  def logical_axes(self) -> Any:
    return self.model.logical_axes()

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path)

  def image_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": unit-norm vision_proj of [CLS] [B, E], "cls": its final-LN state [B, D]}."""
    image = self.model.image_embeds(params, transforms.encoder_pixels(batch["pixels"]))
    return {"embedding": self.model.image_feature(params, image),
            "cls": image[:, 0].astype(jnp.float32)}

  def text_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"embedding": unit-norm text_proj of [CLS] [B, E], "cls": the unimodal [CLS] [B, D]}."""
    hidden = self.model.text_hidden(params, batch["input_ids"], batch["attention_mask"])
    return {"embedding": self.model.text_feature(params, hidden),
            "cls": hidden[:, 0].astype(jnp.float32)}

  def itm_logits(self, params: Any, batch: Mapping[str, Array]) -> Array:
    """The ITM head's logits [B, 2] (no match, match) of each (image, text) row ([ENC] replaces
    [CLS])."""
    image = self.model.image_embeds(params, transforms.encoder_pixels(batch["pixels"]))
    ids = with_first_token(batch["input_ids"], self.model.config.text.enc_token_id)
    hidden = self.model.text_hidden(params, ids, batch["attention_mask"], image)
    return self.model.itm_logits(params, hidden).astype(jnp.float32)

  def itm_scores(self, params: Any, batch: Mapping[str, Array]) -> Array:
    """The ITM head's match probability [B] of each (image, text) row."""
    return jax.nn.softmax(self.itm_logits(params, batch), axis=-1)[:, 1]

  def multimodal_features(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"cls": the image-grounded [ENC] state [B, D]} of an image and a text."""
    image = self.model.image_embeds(params, transforms.encoder_pixels(batch["pixels"]))
    ids = with_first_token(batch["input_ids"], self.model.config.text.enc_token_id)
    hidden = self.model.text_hidden(params, ids, batch["attention_mask"], image)
    return {"cls": hidden[:, 0].astype(jnp.float32)}

  # --- captioning (evals/captioning.py, python -m flava_jax.caption) -------------------------

  def caption_settings(self, **fields: Any) -> blip_generate.CaptionSettings:
    """Decoding settings (blip_generate.CaptionSettings: method, max_length, min_length, ...);
    sampling defaults to the CapFilt captioner's top-k 50."""
    if fields.get("method") == "sample":
      fields.setdefault("top_k", blip_generate.NUCLEUS.top_k)
    return blip_generate.CaptionSettings(**fields)

  def caption_prompt(self, tokenizer: Any, text: str) -> np.ndarray:
    """A prompt text -> the decoder's prompt ids: [DEC] then the text's tokens, no [SEP]."""
    ids, mask, _ = tokenizer.encode(text, self.max_text_length)
    ids = ids[: int(mask.sum())]
    return np.asarray(blip_generate.decoder_prompt(ids, self.model.config.text.bos_token_id))

  def caption(self, params: Any, batch: Mapping[str, Array], prompt: Any,
              settings: blip_generate.CaptionSettings, rng: Array | None = None) -> Array:
    """Generated token ids [B, max_length - prompt length] of uint8 images (batch["pixels"])."""
    pixels = transforms.encoder_pixels(batch["pixels"])
    return blip_generate.captions(self.model, params, pixels, prompt, settings, rng).tokens

  def classifier(self, inputs: str, num_classes: int, hidden_size: int) -> Any:
    raise NotImplementedError("BLIP has no classifier heads: its VQA ranks answers with a "
                              "decoder (the answer_ranking evaluator)")

  def answer_model(self) -> "BlipAnswerModel":
    """BLIP's VQA model (evals/answer_ranking.py)."""
    return BlipAnswerModel(self.model)

  def classifier_width(self, inputs: str) -> int:
    cfg = self.model.config
    return {"image_text": cfg.text.hidden_size, "image": cfg.image.hidden_size,
            "text": cfg.text.hidden_size}[inputs]


@dataclasses.dataclass(frozen=True)
class BlipAnswerModel:
  """BLIP's VQA model: the image-grounded text encoder reads the question ([ENC] first) over the
  image, and an answer decoder of its own (the pretrained decoder copied whole, not shared with
  the encoder) writes the answer cross-attending to the question's states.

  Parameters: {"backbone": the MED's tree as stored, "answer_decoder": {"text_decoder",
  "lm_head"}}; `from_pretrained` fills the answer decoder from the MED's decoder."""

  model: Blip
  BACKBONE = "backbone"

  @property
  def decoder(self) -> Blip:
    return Blip(dataclasses.replace(self.model.config, share_decoder=False, with_encoder=False,
                                    with_decoder=True))

  @property
  def bos_id(self) -> int:
    return self.model.config.text.bos_token_id

  @property
  def enc_id(self) -> int:
    return self.model.config.text.enc_token_id

  @property
  def pad_id(self) -> int:
    return self.model.config.text.pad_token_id

  def check(self, where: str) -> None:
    cfg = self.model.config
    if not (cfg.with_encoder and cfg.with_decoder):
      raise ValueError(f"{where}: VQA needs BLIP's text encoder and decoder; this model has "
                       f"with_encoder={cfg.with_encoder}, with_decoder={cfg.with_decoder}")
    if cfg.image.hidden_size != cfg.text.hidden_size:
      raise ValueError(
          f"{where}: the answer decoder starts as the pretrained decoder, whose cross-attention "
          f"reads image tokens of width model.image.hidden_size={cfg.image.hidden_size}, but it "
          f"reads the question's states here (model.text.hidden_size={cfg.text.hidden_size})")

  def init(self, rng: Array, batch: Any = None) -> dict[str, Any]:
    """{"params": boxed parameters} (random; the caller loads the pretrained ones)."""
    del batch
    backbone_rng, decoder_rng = jax.random.split(rng)
    decoder = self.decoder._init_boxed(decoder_rng)  # pylint: disable=protected-access
    return {"params": {self.BACKBONE: self.model._init_boxed(backbone_rng),  # pylint: disable=protected-access
                       "answer_decoder": {k: decoder[k] for k in ("text_decoder", "lm_head")}}}

  def from_pretrained(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """The answer decoder's parameters from a pretrained MED's (its decoder made whole)."""
    full = self.model.expand(params)
    return {"text_decoder": full["text_decoder"], "lm_head": full["lm_head"]}

  def encode(self, params: Mapping[str, Any], batch: Mapping[str, Array]) -> Array:
    """The question's image-grounded states [B, T, D] (batch: uint8 pixels, input_ids,
    attention_mask of "[CLS] question [SEP]")."""
    backbone = params[self.BACKBONE]
    image = self.model.image_embeds(backbone, transforms.encoder_pixels(batch["pixels"]))
    ids = with_first_token(batch["input_ids"], self.enc_id)
    return self.model.text_hidden(backbone, ids, batch["attention_mask"], image)

  def answer_logits(self, params: Mapping[str, Any], ids: Array, mask: Array, states: Array,
                    states_mask: Array) -> Array:
    """The answer decoder's logits [N, L, V] (float32) of answers "[DEC] answer [SEP]" given
    question states [N, T, D] and their mask [N, T]."""
    return self.decoder.decoder_logits(params["answer_decoder"], ids, mask, states, states_mask)
