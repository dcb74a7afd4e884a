"""BLIP pretraining (flava_jax/tasks/blip.py): ITC with momentum distillation, ITM with hard
negatives, captioning LM, on the MED model.

    python -m flava_jax.main --config=configs/blip.py --workdir=/tmp/blip        # tiny, CPU
    python -m flava_jax.main --config=configs/blip.py:base --workdir=gs://...   # the paper's ViT-B

base is the paper's ViT-B/16 recipe as the reference code runs it: 224 px, captions of 30
tokens, global batch 2880, queue 57,600 (20 batches), momentum 0.995, alpha 0.4 ramped over
the first two epochs, AdamW (weight decay 0.05 on every parameter) warming up from 1e-6 to
3e-4 over 3,000 steps, then 3e-4 * 0.9^epoch (the paper says 0.85; the released config 0.9),
20 epochs. An epoch here is `steps_per_epoch` steps: set it for your corpus (14M pairs / 2880 =
4,861, the default). Real runs name bert-base-uncased's vocab.txt (data.vocab_file): BLIP's
[DEC] and [ENC] are ids 30522 and 30523, past its 30,522 tokens.

tiny: a few narrow layers on the embedded corpus (64 px images, 16 tokens); [DEC] and [ENC]
are the two ids after the embedded vocabulary's 1,024.

CapFilt on the embedded corpus (tools/capfilt.py runs the two fine-tunes itself):
    web           tiny, pretrained on the noisy corpus: the human pairs + the web pairs
    captioner     tiny fine-tuned from a pretrained one (init.model_from) on the human pairs:
                  LM only, prompt "a picture of " (its tokens not targets)
    filter        the same on ITC + ITM, hard negatives from the whole batch
    bootstrapped  tiny on CapFilt's output (--config.data.corpora.capfilt.paths=OUT)
Fine-tuning the paper's ViT-B (set init.model_from to a pretrained BLIP):
    retrieval_coco, retrieval_flickr   ITC + ITM (negative_all_rank), lr 1e-5 cosine, 6 epochs,
                                       batch 256, crop (0.5, 1); evaluated with ITM re-ranking
                                       of the top 256 (128 on Flickr30k)
    caption_coco                       LM with the prompt, lr 1e-5 cosine, 5 epochs, batch 256
They run at the reference's 384 px: the warm start resizes the pretrained position embeddings
(bicubic, as the reference's interpolate_pos_embed).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top

# Pairs per epoch of the 14M-image pretraining corpus (COCO, VG, CC3M, CC12M, SBU).
PAPER_PAIRS = 14_000_000


def model_config(arg: str) -> ml_collections.ConfigDict:
  base = arg == "base"
  if base:
    vision = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, image_size=224,
                  patch_size=16)
    text = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, vocab_size=30524,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=30522,
                enc_token_id=30523, sep_token_id=102)
  else:
    vision = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, image_size=64,
                  patch_size=16)
    text = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, vocab_size=1026,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1024,
                enc_token_id=1025, sep_token_id=3)
  return ml_collections.ConfigDict(dict(
      # The reference ViT's LayerNorms use eps 1e-6; BERT's 1e-12.
      image=dict(vision, layer_norm_eps=1e-6, qkv_bias=True, num_channels=3, vocab_size=8192),
      text=dict(text, layer_norm_eps=1e-12, qkv_bias=True),
      embed_dim=256 if base else 64,
      share_decoder=True,  # the decoder shares every parameter but its self-attention
      tie_word_embeddings=True,
      temp_init=0.07,
      initializer_range=0.02 if base else 0.05,
      dtype="bfloat16" if base else "float32",
      param_dtype="float32",
      attention_impl="auto",
      remat_policy="dots_no_batch" if base else "none",
      scan_unroll=1 if base else 99,
  ))


VARIANTS = ("tiny", "base", "web", "captioner", "filter", "bootstrapped", "retrieval_coco",
            "retrieval_flickr", "caption_coco")
# Pairs per epoch of the fine-tuning sets: COCO Karpathy train (113,287 images x 5 captions) and
# Flickr30k train (29,000 x 5); each step draws one caption of each image it reads.
COCO_PAIRS, FLICKR_PAIRS = 566_747, 145_000
HUMAN_PAIRS, WEB_PAIRS = 1000, 6000  # the embedded corpus's human and web parts


def _embedded(name: str, weight: float = 1.0) -> dict:
  fields = dict(image="image", caption="caption", text="text", label="label")
  return dict(kind="paired", weight=weight, source="embedded", name=name, split="train",
              paths="", data_dir="", fields=fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown BLIP variant {arg!r}; use one of {', '.join(VARIANTS)}")
  if arg in ("tiny", "base"):
    return _pretraining(arg)
  if arg in ("web", "captioner", "filter", "bootstrapped"):
    return _capfilt(arg)
  return _finetuning(arg)


def _capfilt(arg: str) -> ml_collections.ConfigDict:
  config = _pretraining("tiny")
  config.variant = arg
  if arg in ("web", "bootstrapped"):
    if arg == "web":  # the noisy corpus: both parts, each read in proportion to its size
      config.data.corpora = {"human": _embedded("human", HUMAN_PAIRS),
                             "web": _embedded("web", WEB_PAIRS)}
    else:
      corpus = _embedded("")
      corpus.update(source="array_record", paths="")  # CapFilt's output folder
      config.data.corpora = {"capfilt": corpus}
    return config
  # Fine-tuning on the human pairs (COCO's role): 300 steps of 32, about 10 epochs.
  config.data.corpora = {"human": _embedded("human")}
  config.total_steps = 300
  config.checkpoint.every_steps = 300
  config.optimizer.update(learning_rate=2e-4, warmup_steps=20, decay="cosine")
  config.loss.alpha_ramp_steps = 0
  if arg == "captioner":
    config.loss.update(itc=0.0, itm=0.0, lm=1.0, prompt="a picture of ")
    config.evals = ml_collections.ConfigDict()
  else:
    config.loss.update(itc=1.0, itm=1.0, lm=0.0, negatives="global")
    config.data.crop_scale = (0.5, 1.0)
  return config


def _finetuning(arg: str) -> ml_collections.ConfigDict:
  config = _pretraining("base")
  config.variant = arg
  retrieval = arg.startswith("retrieval")
  pairs = FLICKR_PAIRS if arg == "retrieval_flickr" else COCO_PAIRS
  config.global_batch = 256  # 32 per GPU on 8 GPUs
  # 384 px as the reference: the warm start resizes the pretrained 14x14 position embeddings.
  config.model.image.image_size = 384
  steps_per_epoch = pairs // config.global_batch
  epochs = 6 if retrieval else 5
  config.total_steps = epochs * steps_per_epoch
  config.checkpoint.every_steps = steps_per_epoch
  config.optimizer.update(learning_rate=1e-5, warmup_steps=0, warmup_init_fraction=0.0,
                          decay="cosine", end_learning_rate_fraction=0.0,
                          decay_every_steps=steps_per_epoch)
  fields = dict(image="image", caption="captions/text", text="text", label="label")
  if arg == "retrieval_flickr":  # our shards: python -m flava_jax.data.build --kind=paired
    corpus = dict(kind="paired", weight=1.0, source="array_record", name="", split="train",
                  paths="", data_dir="", fields=dict(fields, caption="caption"))
  else:
    corpus = dict(kind="paired", weight=1.0, source="tfds", name="coco_captions", split="train",
                  paths="", data_dir="", fields=fields)
  config.data.corpora = {"paired": corpus}
  if retrieval:
    config.loss.update(itc=1.0, itm=1.0, lm=0.0, negatives="global", queue_size=57600,
                       alpha=0.4, alpha_ramp_steps=steps_per_epoch)
    config.data.crop_scale = (0.5, 1.0)
    evals = config.evals.retrieval
    evals.rerank_k = 128 if arg == "retrieval_flickr" else 256
    evals.rerank_score = "itm+itc"
    if arg == "retrieval_coco":
      evals.data.update(source="tfds", name="coco_captions", split="test")
      evals.data.fields.caption = "captions/text"
    else:
      evals.data.update(source="array_record", name="", split="test")
      evals.data.fields.caption = "caption"
  else:
    config.loss.update(itc=0.0, itm=0.0, lm=1.0, prompt="a picture of ")
    config.evals = ml_collections.ConfigDict()
  return config


def _pretraining(arg: str) -> ml_collections.ConfigDict:
  base = arg == "base"
  flava_variant = "full" if base else "tiny"
  reference = flava.get_config(flava_variant)
  config = ml_collections.ConfigDict()
  config.task = "blip"
  config.variant = arg
  config.model = model_config(arg)
  config.seed = 0
  config.global_batch = 2880 if base else 32
  config.text_length = 30 if base else 16
  steps_per_epoch = PAPER_PAIRS // 2880 if base else 6000 // 32
  config.total_steps = 20 * steps_per_epoch if base else 2000
  config.log_every_steps = 100 if base else 50
  config.grad_accum = 1
  config.grad_cache = False
  config.loss = ml_collections.ConfigDict(dict(
      itc=1.0, itm=1.0, lm=1.0,
      queue_size=57600 if base else 32 * 16,  # a multiple of global_batch (checked)
      momentum=0.995,
      alpha=0.4,
      alpha_ramp_steps=2 * steps_per_epoch,
      negatives="device",  # "global": hard negatives from the whole batch (negative_all_rank)
      label_smoothing=0.1,
      prompt="",  # captioning fine-tuning: prepended to captions, not an LM target
  ))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=2000 if base else 200, keep=3, async_save=True))
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4 if base else 2e-3,
      warmup_steps=3000 if base else 40,
      warmup_init_fraction=1e-6 / 3e-4 if base else 0.0,
      decay="step" if base else "cosine",
      decay_rate=0.9,
      decay_every_steps=steps_per_epoch,
      end_learning_rate_fraction=1e-6 / 3e-4 if base else 0.0,
      weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0, mu_dtype="float32",
      trainable=()))
  data = reference.data
  data.corpora = {"paired": dict(data.corpora.paired.to_dict(), weight=1.0)}
  # BLIP's augmentation: RandomResizedCrop scale (0.2, 1.0), horizontal flip, RandAugment(2, 5)
  # over the reference's operations; captions cleaned (pre_caption) and cut to 30 words.
  data.crop_scale = (0.2, 1.0)
  data.horizontal_flip = True
  data.randaugment = (2, 5)
  data.clean_captions = True
  data.caption_max_words = 30
  config.data = data
  config.evals = ml_collections.ConfigDict(dict(retrieval=reference.evals.retrieval.to_dict()))
  config.init = ml_collections.ConfigDict(dict(model_from=""))
  config.sharding = reference.sharding
  return config
