"""Audio-text contrastive pretraining (flava_jax/tasks/audio_text.py) on the spoken embedded part.

    python -m flava_jax.main --config=configs/audio_text.py --workdir=/tmp/audio_text
    --config=configs/audio_text.py:base   wav2vec2-base's audio tower and a BERT-base text tower

`audio` mirrors models/audio.AudioConfig (wav2vec 2.0's layout: seven convolutions, 320 samples
per frame at 16 kHz); `model` is FlavaConfig (its text section is the text tower; image and
multimodal are unused). The corpus is the embedded spoken part (captions spoken by eSpeak NG with
varied voices, rates and pitches; built on first use), or shards of `python -m
flava_jax.data.build --kind=audio` (source=array_record, paths=DIR). Evaluation: audio<->text
retrieval on the 256 held-out spoken captions at the end.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top

FIELDS = dict(image="image", caption="caption", text="", label="", text_pair="", answers="",
              audio="audio")


def audio_config(arg: str) -> ml_collections.ConfigDict:
  if arg == "base":  # facebook/wav2vec2-base (transformers' Wav2Vec2Config defaults)
    return ml_collections.ConfigDict(dict(
        hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, layer_norm_eps=1e-5,
        qkv_bias=True, conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=False, feat_extract_norm="group",
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16))
  # tiny: the same layout, narrow (16 channels, width 64, two layers, a 16-tap positional conv)
  # and a last stride of 4 (one frame per 40 ms: half the frames, for CPU speed).
  return ml_collections.ConfigDict(dict(
      hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, layer_norm_eps=1e-5,
      qkv_bias=True, conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 4),
      conv_stride=(5, 2, 2, 2, 2, 2, 4), conv_bias=False, feat_extract_norm="group",
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  if arg not in ("tiny", "base"):
    raise ValueError(f"unknown variant {arg!r}; use tiny or base")
  base = flava.get_config("full" if arg == "base" else "tiny")
  config = ml_collections.ConfigDict()
  config.task = "audio_text"
  config.variant = arg
  config.model = base.model
  config.model.image.num_layers = 1  # unused by the two towers
  config.model.multimodal.num_layers = 1
  config.audio = audio_config(arg)
  config.audio_samples = 80_000  # 5 s at 16 kHz: every spoken caption fits (the longest ~4.6 s)
  config.text_length = 32
  config.seed = 0
  config.global_batch = 4096 if arg == "base" else 32
  config.total_steps = 20_000 if arg == "base" else 1000
  config.log_every_steps = base.log_every_steps
  config.grad_accum = 1
  config.grad_cache = False
  config.checkpoint = base.checkpoint
  config.optimizer = base.optimizer
  if arg == "tiny":
    config.optimizer.warmup_steps = 100
  data = base.data
  data.corpora = {"spoken": dict(kind="trimodal", weight=1.0, source="embedded", name="spoken",
                                 split="train", paths="", data_dir="", fields=dict(FIELDS))}
  data.audio_time_masks = 2  # SpecAugment-style: two spans of up to 0.1 s zeroed per example
  config.data = data
  config.evals = ml_collections.ConfigDict(dict(audio_retrieval=dict(
      evaluator="audio_retrieval", every_steps=0, limit=0, batch_size=256,
      data=dict(source="embedded", name="spoken", split="test", paths="", data_dir="",
                fields=dict(FIELDS)))))
  # Warm starts: audio_from takes a transformers Wav2Vec2Model directory (facebook/wav2vec2-base
  # for :base, downloaded elsewhere) or an audio_text workdir; text_from a FLAVA run's text tower.
  config.init = ml_collections.ConfigDict(dict(model_from="", audio_from="", text_from=""))
  config.sharding = base.sharding
  return config
