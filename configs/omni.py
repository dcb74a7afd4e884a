"""The tri-modal pretrainer (OPT; flava_jax/tasks/omni.py) on the spoken embedded part.

    python -m flava_jax.main --config=configs/omni.py --workdir=/tmp/omni
    --config=configs/omni.py:base   the paper's sizes and recipe (BERT-base text and cross-modal
                                    stacks, a ViT-B/16 on 128 px images, wav2vec2-base audio)

`model` is FlavaConfig: its text and image sections are the text and image encoders, its
`multimodal` section the cross-modal stack; `audio` mirrors models/audio.AudioConfig;
`text_decoder` and `image_decoder` are block stacks (EncoderConfig) that cross-attend to the
cross-modal outputs; `dvae` is the frozen tokenizer (images of the patch grid x 8 pixels: 64 px ->
8 x 8 codes, the image decoder's targets and MVM's classes). The corpus is the embedded spoken
part (the drawn scenes, their captions and the captions spoken by eSpeak NG; built on first use)
or shards of `python -m flava_jax.data.build --kind=trimodal`.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import audio_text, flava  # noqa: E402  pylint: disable=g-import-not-at-top
from configs.eval import (linear_probe, omni_retrieval, speech_to_text,  # noqa: E402  pylint: disable=C0413
                          text_to_image)

FIELDS = audio_text.FIELDS


def decoder_config(arg: str) -> ml_collections.ConfigDict:
  if arg == "base":  # six BERT-base-wide layers (the paper does not give the decoders' depth)
    return ml_collections.ConfigDict(dict(hidden_size=768, num_layers=6, num_heads=12,
                                          mlp_dim=3072, layer_norm_eps=1e-12, qkv_bias=True))
  return ml_collections.ConfigDict(dict(hidden_size=64, num_layers=1, num_heads=4, mlp_dim=128,
                                        layer_norm_eps=1e-12, qkv_bias=True))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  if arg not in ("tiny", "base"):
    raise ValueError(f"unknown variant {arg!r}; use tiny or base")
  base = arg == "base"
  flava_config = flava.get_config("full" if base else "tiny")
  config = ml_collections.ConfigDict()
  config.task = "omni"
  config.variant = arg
  config.model = flava_config.model
  # 8 x 8 patches: the image decoder's 8 x 8 code grid of a 64 px view (one code per patch).
  config.model.image.image_size = 128 if base else 64
  config.model.image.patch_size = 16 if base else 8
  config.model.multimodal.num_layers = 12 if base else 2  # the cross-modal stack
  config.audio = audio_text.audio_config(arg)
  config.text_decoder = decoder_config(arg)
  config.image_decoder = decoder_config(arg)
  config.dvae = flava_config.dvae
  config.loss = ml_collections.ConfigDict(dict(
      mlm=1.0, mvm_regression=1.0, mvm_class=1.0, mam_regression=1.0, mam_contrastive=1.0,
      dtr=1.0, dir=1.0, match=1.0, mam_temperature=0.1))
  config.masking = ml_collections.ConfigDict(dict(patch_rate=0.15, frame_rate=0.15,
                                                  modality_rate=0.3))
  config.audio_samples = 80_000  # 5 s at 16 kHz: every spoken caption fits (the longest ~4.6 s)
  config.text_length = 40 if base else 32
  config.seed = 0
  config.global_batch = 256 if base else 32
  config.total_steps = 100_000 if base else 1000
  config.log_every_steps = flava_config.log_every_steps
  config.grad_accum = 1
  config.grad_cache = False
  config.checkpoint = flava_config.checkpoint
  # The reference's recipe: AdamW (0.9, 0.98), lr 5e-5, weight decay 0.01, clip 5, 1,000 warm-up
  # steps; tiny trains from scratch, faster.
  config.optimizer = flava_config.optimizer
  config.optimizer.update(dict(learning_rate=5e-5, warmup_steps=1000, weight_decay=0.01,
                               b1=0.9, b2=0.98, grad_clip_norm=5.0) if base else
                          dict(learning_rate=2e-3, warmup_steps=80, weight_decay=0.01, b1=0.9,
                               b2=0.98, grad_clip_norm=5.0))
  data = flava_config.data
  data.corpora = {"spoken": dict(kind="trimodal", weight=1.0, source="embedded", name="spoken",
                                 split="train", paths="", data_dir="", fields=dict(FIELDS))}
  config.data = data
  # At the end, on 100 held-out records: retrieval among captions, images and recordings, speech
  # to text (WER) and text to image (codes, pixels); and a linear probe on the cross-modal [CLS]
  # with each subset of the modalities (1,000 training records).
  config.evals = ml_collections.ConfigDict(dict(
      omni_retrieval=omni_retrieval.task(100), speech_to_text=speech_to_text.task(100),
      text_to_image=text_to_image.task(100), probe=linear_probe.task("omni", 1000)))
  config.init = ml_collections.ConfigDict(dict(model_from="", image_from="", text_from="",
                                               audio_from="", dvae_from=""))
  config.sharding = flava_config.sharding
  config.sharding.rules = list(config.sharding.rules) + [("modality", None)]
  return config
