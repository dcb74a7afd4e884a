"""The tri-modal pretrainer (OPT, the Omni-Perception Pre-Trainer; `omni`): text, image and audio
with token-, modality- and sample-level objectives and two decoders (models/omni.py,
losses/omni.py).

    python -m flava_jax.main --config=configs/omni.py --workdir=/tmp/omni

One step kind, "trimodal" (image + caption + the caption's audio), two passes per step:
  denoising pass: the masked text (MLM), patches (MVM) and frames (MAM), and whole modalities
      left out of the cross-modal keys (`present`); MLM, MVM and MAM count on the modalities
      present; DTR and DIR decode the clean caption and the image's dVAE codes from the
      cross-modal outputs
  matching pass: the clean inputs with one or two modalities replaced by other rows' (the
      row's `match_class`), all present; the 5-way classifier on [CLS]

Config sections: `model` (FlavaConfig: the text and image encoders, `multimodal` is the
cross-modal stack, compute settings), `audio` (AudioConfig), `text_decoder` and
`image_decoder` (EncoderConfig), `dvae` (the frozen tokenizer: MVM classes, DIR targets, and
pixels from codes), `loss` (losses/omni.LossConfig), `masking` (patch_rate, frame_rate,
modality_rate; the text rate is data.mlm_rate); scalars `audio_samples`, `text_length`.
`init.model_from` / `image_from` / `text_from` / `audio_from` load parts (an audio part from a
transformers Wav2Vec2Model directory too), `init.dvae_from` the tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flava_jax import flops, run_once, warm_start
from flava_jax.data import pipeline
from flava_jax.losses import masked, omni as omni_losses
from flava_jax.losses.blip import take_rows
from flava_jax.models.audio import AudioConfig
from flava_jax.models.config import DVAEConfig, EncoderConfig, FlavaConfig, dvae_view_size
from flava_jax.models.dvae import DVAE, init_dvae_params
from flava_jax.models import omni_generate
from flava_jax.models.omni import MATCH_CLASSES, MODALITIES, OmniModel, Sequences
from flava_jax.parse import dataclass_from_dict
from flava_jax.tasks.base import LossOutput, StepContext, Task, from_boxed
from flava_jax.tasks.flava import EncoderSizes, decays, model_pixels

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Token-level masking rates of patches and audio frames, and the modality-level rate."""

  patch_rate: float = 0.15
  frame_rate: float = 0.15
  modality_rate: float = 0.3

  def __post_init__(self):
    for name in ("patch_rate", "frame_rate"):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f"masking.{name}={getattr(self, name)} must be in (0, 1)")
    if not 0 <= self.modality_rate < 1:
      raise ValueError(f"masking.modality_rate={self.modality_rate} must be in [0, 1)")


def _encoder_config(values: Any, prefix: str) -> EncoderConfig:
  config = dataclass_from_dict(EncoderConfig, values, prefix)
  config.validate(prefix)
  return config


class OmniTask(Task):
  """Tri-modal pretraining (text, image, audio)."""

  NAME = "omni"
  SECTIONS = ("model", "audio", "text_decoder", "image_decoder", "dvae", "loss", "masking")
  SCALARS = {"audio_samples": int, "text_length": int}
  WARM_STARTS = {"model_from": None, "image_from": ("image_encoder",),
                 "text_from": ("text_encoder",), "audio_from": ("audio_encoder",)}
  FROZEN_STARTS = {"dvae_from": "dVAE"}

  def __init__(self, config: Mapping[str, Any]):
    self.model_config = FlavaConfig.from_dict(config["model"])
    self.audio_config = AudioConfig.from_dict(config["audio"], "audio")
    self.text_decoder_config = _encoder_config(config["text_decoder"], "text_decoder")
    self.image_decoder_config = _encoder_config(config["image_decoder"], "image_decoder")
    self.dvae_config = DVAEConfig.from_dict(config["dvae"])
    self.loss_config = dataclass_from_dict(omni_losses.LossConfig, config["loss"], "loss")
    self.masking = dataclass_from_dict(MaskingConfig, config["masking"], "masking")
    self.samples = int(config["audio_samples"])
    self.text_length = int(config["text_length"])
    self.frames = int(self.audio_config.frames(self.samples))
    if self.frames < 1:
      raise ValueError(f"config.audio_samples={self.samples} is shorter than the audio "
                       "encoder's receptive field (no frame)")
    if self.text_length > self.model_config.text.max_position_embeddings:
      raise ValueError(f"config.text_length={self.text_length} exceeds "
                       "model.text.max_position_embeddings")
    image = self.model_config.image
    self.dvae_size = dvae_view_size(image, self.dvae_config)
    self.model = OmniModel(self.model_config, self.audio_config, self.text_decoder_config,
                           self.image_decoder_config, self.dvae_config.vocab_size,
                           image.num_patches)
    self.dvae = DVAE(self.dvae_config)
    self.sequences = Sequences(self.text_length, 1 + image.num_patches, self.frames)

  # --- data ---------------------------------------------------------------------------------

  @property
  def kinds(self) -> tuple[str, ...]:
    return ("trimodal",)

  def data_shapes(self) -> pipeline.Shapes:
    image, text = self.model_config.image, self.model_config.text
    return pipeline.Shapes(
        image_size=image.image_size, patch_size=image.patch_size, dvae_size=self.dvae_size,
        paired_text_length=self.text_length, text_length=self.text_length,
        text_vocab_size=text.vocab_size, text_pad_id=text.pad_token_id)

  def processors(self, data_cfg: Any, kinds, train: bool = True) -> dict[str, Any]:
    shapes = self.data_shapes()
    tok = pipeline.load_tokenizer(data_cfg, shapes)
    m = self.masking
    return {"trimodal": pipeline.trimodal_processor(
        data_cfg, shapes, tok, self.samples, self.audio_config.frames, train,
        m.patch_rate, m.frame_rate, m.modality_rate)}

  def batch_spec(self, kind: str, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    image, length = self.model_config.image, self.text_length
    size, dvae = image.image_size, self.dvae_size
    spec = {"pixels": ((rows, size, size, 3), jnp.uint8),
            "dvae_pixels": ((rows, dvae, dvae, 3), jnp.uint8),
            "patch_mask": ((rows, image.num_patches), jnp.bool_),
            "input_ids": ((rows, length), jnp.int32),
            "input_ids_masked": ((rows, length), jnp.int32),
            "attention_mask": ((rows, length), jnp.int32),
            "mlm_labels": ((rows, length), jnp.int32),
            "audio": ((rows, self.samples), jnp.float32),
            "audio_mask": ((rows, self.samples), jnp.int32),
            "frame_mask": ((rows, self.frames), jnp.bool_),
            "present": ((rows, len(MODALITIES)), jnp.bool_),
            "match_class": ((rows,), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(*v) for k, v in spec.items()}

  def random_batch(self, kind: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs with the processor's masks (the bench, the AOT tool, tests)."""
    rng, spec = np.random.default_rng(seed), self.batch_spec(kind, rows)
    out = {k: rng.integers(0, 256, spec[k].shape, dtype=np.uint8)
           for k in ("pixels", "dvae_pixels")}
    vocab, length = self.model_config.text.vocab_size, self.text_length
    lengths = rng.integers(length // 2, length + 1, rows)
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(attention, rng.integers(5, vocab, (rows, length)), 0).astype(np.int32)
    ids[:, 0] = 2  # [CLS]
    chosen = (rng.random((rows, length)) < 0.15) & (attention == 1)
    chosen[:, 0] = False
    out.update(input_ids=ids, attention_mask=attention,
               input_ids_masked=np.where(chosen, 4, ids).astype(np.int32),
               mlm_labels=np.where(chosen, ids, masked.IGNORE_INDEX).astype(np.int32))
    samples = rng.integers(self.samples // 2, self.samples + 1, rows)
    audio_mask = (np.arange(self.samples)[None] < samples[:, None]).astype(np.int32)
    out.update(audio=(rng.normal(0, 0.1, (rows, self.samples)) * audio_mask).astype(np.float32),
               audio_mask=audio_mask)
    real = np.arange(self.frames)[None] < np.array(
        [self.audio_config.frames(int(n)) for n in samples])[:, None]
    out["frame_mask"] = (rng.random((rows, self.frames)) < self.masking.frame_rate) & real
    out["patch_mask"] = rng.random(spec["patch_mask"].shape) < self.masking.patch_rate
    present = rng.random((rows, 3)) >= self.masking.modality_rate
    present[~present.any(1), 0] = True
    out["present"] = present
    out["match_class"] = rng.integers(0, len(MATCH_CLASSES), rows).astype(np.int32)
    return out

  # --- state --------------------------------------------------------------------------------

  def _init(self, rng: Array) -> Any:
    size = self.model_config.image.image_size
    return self.model.init(rng, jnp.zeros((1, self.text_length), jnp.int32),
                           jnp.ones((1, self.text_length), jnp.int32),
                           jnp.zeros((1, size, size, 3), jnp.float32),
                           jnp.zeros((1, self.samples), jnp.float32),
                           jnp.ones((1, self.samples), jnp.int32))["params"]

  def init_params(self, rng: Array) -> Any:
    return nn.meta.unbox(run_once.jit(self._init)(rng))

  def logical_axes(self) -> Any:
    return self.abstract_params()[1]

  def abstract_params(self) -> tuple[Any, Any]:
    return from_boxed(jax.eval_shape(self._init, jax.random.key(0)))

  def decays(self, path: tuple[str, ...]) -> bool:
    return decays(path) or (bool(path) and path[-1] in ("token_embed", "modality_embed"))

  def init_frozen(self, seed: int, sources: Mapping[str, str], kinds) -> Any:
    """The dVAE (init.dvae_from, else random): its encoder gives the codes; its decoder, when
    the source has one, turns generated codes into pixels."""
    source = sources.get("dvae_from", "")
    if not source:
      key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 1)
      return init_dvae_params(self.dvae, key, image_size=self.dvae_size)
    loaded = warm_start.read_dvae_params(source)
    abstract = self.abstract_frozen()
    parts = tuple(p for p in ("encoder", "decoder") if p in loaded)
    params, _ = warm_start.replace_parts({p: abstract[p] for p in parts}, loaded, parts,
                                         "init.dvae_from")
    return params

  def abstract_frozen(self) -> Any:
    return jax.eval_shape(lambda: init_dvae_params(self.dvae, jax.random.key(0),
                                                   image_size=self.dvae_size))

  # --- the step -----------------------------------------------------------------------------

  def _apply(self, params: Any, *args, method: str, **kwargs) -> Any:
    return self.model.apply({"params": params}, *args, method=method, **kwargs)

  def codes(self, frozen: Any, dvae_pixels: Array) -> Array:
    """The images' dVAE codes [B, P] (no gradient)."""
    return jax.lax.stop_gradient(self.dvae.apply({"params": frozen}, dvae_pixels,
                                                 method="tokens"))

  def _encode(self, params: Any, ids: Array, attention: Array, pixels: Array,
              audio: Array, audio_mask: Array, patch_mask: Array | None = None,
              frame_mask: Array | None = None) -> dict[str, Array]:
    sound = self._apply(params, audio, audio_mask, frame_mask, method="encode_audio")
    return {"text": self._apply(params, ids, attention, method="encode_text"),
            "image": self._apply(params, pixels, patch_mask, method="encode_image"),
            "audio": sound["hidden"], "features": sound["features"],
            "frames": sound["frame_mask"], "attention": attention.astype(bool)}

  def key_mask(self, attention: Array, frames: Array, present: Array) -> Array:
    """The cross-modal keys [B, 1+L+1+P+F]: [CLS], real tokens and frames of the modalities
    present (present [B, 3]: text, image, audio)."""
    rows = attention.shape[0]
    present = present.astype(bool)
    image = jnp.broadcast_to(present[:, 1:2], (rows, self.sequences.image))
    return jnp.concatenate([jnp.ones((rows, 1), bool),
                            attention.astype(bool) & present[:, 0:1], image,
                            frames.astype(bool) & present[:, 2:3]], axis=1)

  def fuse(self, params: Any, states: Mapping[str, Array], present: Array
           ) -> tuple[Array, Array]:
    """(cross-modal outputs, their key mask) of unimodal states (`_encode`'s text, attention,
    image, audio, frames) with the modalities in present [B, 3] (or [3]: every row)."""
    rows = states["text"].shape[0]
    present = jnp.broadcast_to(jnp.asarray(present, bool), (rows, len(MODALITIES)))
    keys = self.key_mask(states["attention"], states["frames"], present)
    hidden = self._apply(params, states["text"], states["image"], states["audio"], keys,
                         method="fuse")
    return hidden, keys

  def loss(self, kind: str, params: Any, extra: Any, frozen: Any, batch: Mapping[str, Array],
           rng: Array, ctx: StepContext) -> LossOutput:
    del extra
    if kind != "trimodal":
      raise ValueError(f"the omni task has one batch kind, trimodal, not {kind!r}")
    cfg, seq = self.loss_config, self.sequences
    batch = model_pixels(batch)
    present = batch["present"].astype(bool)
    metrics, total = {}, 0.0

    def add(name: str, value: Array) -> None:
      nonlocal total
      metrics[name] = value
      total = total + getattr(cfg, name) * value

    # The denoising pass: token-level masks, whole modalities left out of the keys.
    enc = self._encode(params, batch["input_ids_masked"], batch["attention_mask"],
                       batch["pixels"], batch["audio"], batch["audio_mask"], batch["patch_mask"],
                       batch["frame_mask"])
    hidden, keys = self.fuse(params, enc, present)
    need_codes = cfg.mvm_class or cfg.dir
    codes = self.codes(frozen, batch["dvae_pixels"]) if need_codes else None
    if cfg.mlm:
      logits = self._apply(params, seq.part(hidden, "text"), method="mlm_logits")
      weights = masked.label_weights(batch["mlm_labels"], present[:, 0])
      add("mlm", masked.masked_prediction_loss(logits, batch["mlm_labels"], weights)[0])
    if cfg.mvm_regression or cfg.mvm_class:
      regressed, logits = self._apply(params, seq.part(hidden, "image")[:, 1:],
                                      method="mvm_outputs")
      weights = batch["patch_mask"] & present[:, 1:2]
      if cfg.mvm_regression:
        target = self._apply(params, batch["pixels"], method="patch_features")
        add("mvm_regression", omni_losses.feature_regression(regressed, target, weights)[0])
      if cfg.mvm_class:
        add("mvm_class", masked.masked_prediction_loss(logits, codes, weights)[0])
    if cfg.mam_regression or cfg.mam_contrastive:
      regressed, queries = self._apply(params, seq.part(hidden, "audio"), method="mam_outputs")
      weights = batch["frame_mask"] & enc["frames"] & present[:, 2:3]
      if cfg.mam_regression:
        add("mam_regression",
            omni_losses.feature_regression(regressed, enc["features"], weights)[0])
      if cfg.mam_contrastive:
        add("mam_contrastive", omni_losses.frame_contrastive(
            queries, enc["features"], weights, enc["frames"], cfg.mam_temperature)[0])
    if cfg.dtr:
      ids, attention = batch["input_ids"], batch["attention_mask"]
      logits = self._apply(params, ids[:, :-1], attention[:, :-1], hidden, keys,
                           method="text_decoder_logits")
      add("dtr", omni_losses.next_token_loss(logits, ids[:, 1:], attention[:, 1:])[0])
    if cfg.dir:
      start = jnp.full((codes.shape[0], 1), self.dvae_config.vocab_size, codes.dtype)  # [BOS]
      logits = self._apply(params, jnp.concatenate([start, codes[:, :-1]], axis=1), hidden, keys,
                           method="image_decoder_logits")
      add("dir", omni_losses.next_token_loss(logits, codes, jnp.ones(codes.shape))[0])
    if cfg.match:
      loss, accuracy = self.match(params, batch, rng, ctx.local_batch)
      add("match", loss)
      metrics["match_accuracy"] = accuracy
    for i, name in enumerate(MODALITIES):
      metrics[f"{name}_present"] = jnp.mean(present[:, i].astype(jnp.float32))
    return LossOutput(total, metrics)

  def match(self, params: Any, batch: Mapping[str, Array], rng: Array, local_batch: int
            ) -> tuple[Array, Array]:
    """The matching pass: (5-way loss, accuracy) on clean inputs whose text, image or audio is
    replaced by another row's of the same shard as `match_class` says."""
    rows = batch["match_class"].shape[0]
    block = local_batch if local_batch < rows else rows
    sources = omni_losses.match_sources(batch["match_class"], block, rng)
    enc = self._encode(params, batch["input_ids"], batch["attention_mask"], batch["pixels"],
                       batch["audio"], batch["audio_mask"])
    owner = {"text": "text", "attention": "text", "image": "image", "audio": "audio",
             "frames": "audio"}  # the modality each state belongs to
    mixed = {k: take_rows(enc[k], sources[m], block) for k, m in owner.items()}
    hidden, _ = self.fuse(params, mixed, (True, True, True))
    logits = self._apply(params, hidden, method="match_logits")
    return omni_losses.match_loss(logits, batch["match_class"])

  # --- figures ------------------------------------------------------------------------------

  def step_flops(self, kind: str, global_batch: int) -> float:
    cfg, seq = self.model_config, self.sequences
    encoders = (flops.text_encoder_flops(cfg, self.text_length) + flops.image_encoder_flops(cfg)
                + flops.audio_encoder_flops(self.audio_config, self.samples))
    cross = flops.encoder_flops(cfg.multimodal, seq.total)
    width = cfg.multimodal.hidden_size
    decoders = 0.0
    for dec, length, vocab in ((self.text_decoder_config, self.text_length - 1,
                                cfg.text.vocab_size),
                               (self.image_decoder_config, cfg.image.num_patches,
                                self.dvae_config.vocab_size)):
      d = dec.hidden_size
      cross_attention = dec.num_layers * (2 * length * d * d * 2 + 2 * seq.total * width * 2 * d
                                          + 2 * 2 * length * seq.total * d)
      decoders += flops.encoder_flops(dec, length) + cross_attention + 2 * length * d * vocab
    heads = (flops.head_flops(width, cfg.text.vocab_size, self.text_length)
             + flops.head_flops(width, self.dvae_config.vocab_size, cfg.image.num_patches)
             + 2 * seq.total * width * (cfg.image.hidden_size + 2 * self.audio_config.conv_dim[-1]))
    per_example = 3 * (2 * (encoders + cross) + decoders + heads)
    return global_batch * (per_example + flops.dvae_encoder_flops(self.dvae_config,
                                                                  self.dvae_size))

  def describe(self, params: Any) -> str:
    seconds = self.samples / self.audio_config.sample_rate
    return (f"omni: text {self.text_length} + image {self.sequences.image} + audio "
            f"{self.frames} frames ({seconds:.2f} s) = {self.sequences.total} cross-modal "
            "tokens")

  def predict(self) -> "OmniPredictor":
    return OmniPredictor(self)


@dataclasses.dataclass(frozen=True)
class OmniPredictor(EncoderSizes):
  """What evaluators call on an omni model: the encoders' states, the match classifier and the
  decoders over any subset of the three modalities."""

  task: OmniTask

  @property
  def model(self) -> OmniModel:
    return self.task.model

  def logical_axes(self) -> Any:
    return self.task.logical_axes()

  @property
  def audio_samples(self) -> int:
    return self.task.samples

  @property
  def text_length(self) -> int:
    return self.task.text_length

  def unimodal(self, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """The three encoders' outputs of clean inputs (pixels uint8): text [B, L, D_t], attention
    [B, L], image [B, 1+P, D_i], audio [B, F, D_a], frames [B, F] (real frames)."""
    task = self.task
    batch = model_pixels(batch)
    enc = task._encode(params, batch["input_ids"], batch["attention_mask"], batch["pixels"],
                       batch["audio"], batch["audio_mask"])
    return {k: enc[k] for k in ("text", "attention", "image", "audio", "frames")}

  def match_from_states(self, params: Any, states: Mapping[str, Array],
                        present: tuple[bool, bool, bool]) -> Array:
    """[B, 5] match logits of unimodal states (`unimodal`'s, rows mixed from several
    examples) with the modalities in `present` (text, image, audio) given to the cross-modal
    stack."""
    hidden, _ = self.task.fuse(params, states, present)
    return self.task._apply(params, hidden, method="match_logits")

  def _hidden(self, params: Any, batch: Mapping[str, Array], present: tuple[bool, bool, bool]
              ) -> tuple[Array, Array]:
    """(cross-modal outputs, key mask) of clean inputs with the modalities in `present`."""
    return self.task.fuse(params, self.unimodal(params, batch), present)

  def transcribe(self, params: Any, batch: Mapping[str, Array],
                 present: tuple[bool, bool, bool], max_length: int, start_id: int,
                 eos_id: int) -> Array:
    """Greedy text [B, max_length] from the modalities in `present` (speech to text: audio
    alone, or audio and image): the text decoder, [CLS] first, reading the cross-modal outputs
    of those modalities only."""
    hidden, keys = self._hidden(params, batch, present)
    pad = self.task.model_config.text.pad_token_id
    return omni_generate.decode_text(self.model, params, hidden, keys, start_id=start_id,
                                     eos_id=eos_id, pad_id=pad, max_length=max_length).sequences

  @property
  def dvae_size(self) -> int:
    """Pixels per side of the dVAE's view (one code per image patch)."""
    return self.task.dvae_size

  @property
  def code_vocab(self) -> int:
    return self.task.dvae_config.vocab_size

  def image_codes(self, frozen: Any, dvae_pixels: Array) -> Array:
    """The dVAE's codes [B, P] of uint8 images [B, S, S, 3] at its view size (the DIR
    targets)."""
    return self.task.codes(frozen, model_pixels({"dvae_pixels": dvae_pixels})["dvae_pixels"])

  def code_pixels(self, frozen: Any, codes: Array) -> Array:
    """Images [B, S, S, 3] in [0, 1] of codes [B, P]: the dVAE's decoder (the mean of its
    logit-Laplace)."""
    grid = self.task.model_config.image.grid_size
    return self.task.dvae.apply({"params": frozen}, codes, (grid, grid), method="reconstruct")

  def cross_modal_cls(self, params: Any, batch: Mapping[str, Array],
                      subsets: tuple[tuple[bool, bool, bool], ...]) -> Array:
    """The cross-modal [CLS] output [B, len(subsets), D] of clean inputs, once per subset of
    the modalities (text, image, audio); the encoders run once."""
    states = self.unimodal(params, batch)
    return jnp.stack([self.task.fuse(params, states, present)[0][:, 0] for present in subsets],
                     axis=1)

  def generate_codes(self, params: Any, batch: Mapping[str, Array],
                     present: tuple[bool, bool, bool], rng: Array, top_k: int,
                     temperature: float = 1.0) -> Array:
    """An image's dVAE codes [B, P] from the modalities in `present` (text to image: text
    alone, or text and audio), sampled top-k from the image decoder."""
    hidden, keys = self._hidden(params, batch, present)
    return omni_generate.sample_codes(self.model, params, hidden, keys, rng, top_k=top_k,
                                      temperature=temperature)
