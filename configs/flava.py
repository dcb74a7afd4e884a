"""FLAVA model configs.

    --config=configs/flava.py:full   FLAVA-full sizes (ViT-B/16 image and text, 6-layer fusion)
    --config=configs/flava.py:tiny   a few layers, small widths: CPU tests and the default run
    --config=configs/flava.py        same as :tiny

Fields of `config.model` mirror flava_jax.models.config.FlavaConfig; `config.dvae` mirrors
DVAEConfig; `config.sharding` holds the mesh shape and the logical-axis rules.
"""

import ml_collections


# Sizes per variant. full = FLAVA-full (transformers' FlavaConfig defaults); tiny = CPU tests and
# the default run (64 px images -> a 4x4 patch grid, small vocabularies).
_SIZES = {
    "full": dict(width=768, heads=12, mlp=3072, image_layers=12, text_layers=12, fusion_layers=6,
                 image_size=224, image_vocab=8192, text_vocab=30522, max_text=512,
                 dtype="bfloat16", init_std=0.02, remat="dots_no_batch", unroll=1),
    "tiny": dict(width=64, heads=4, mlp=128, image_layers=2, text_layers=2, fusion_layers=1,
                 image_size=64, image_vocab=512, text_vocab=1024, max_text=128, dtype="float32",
                 init_std=0.05, remat="none", unroll=99),
}


def model_config(arg: str) -> ml_collections.ConfigDict:
  if arg not in _SIZES:
    raise ValueError(f"unknown model variant {arg!r}; use one of: {', '.join(_SIZES)}")
  s = _SIZES[arg]
  encoder = dict(hidden_size=s["width"], num_heads=s["heads"], mlp_dim=s["mlp"],
                 layer_norm_eps=1e-12, qkv_bias=True)
  return ml_collections.ConfigDict(dict(
      image=dict(encoder, num_layers=s["image_layers"], image_size=s["image_size"], patch_size=16,
                 num_channels=3, vocab_size=s["image_vocab"]),
      text=dict(encoder, num_layers=s["text_layers"], vocab_size=s["text_vocab"],
                max_position_embeddings=s["max_text"], type_vocab_size=2, pad_token_id=0),
      multimodal=dict(encoder, num_layers=s["fusion_layers"]),
      projection_dim=s["width"],
      logit_scale_init=2.6592,
      pretraining_heads=True,
      initializer_range=s["init_std"],
      dtype=s["dtype"],
      param_dtype="float32",
      # auto: cuDNN flash attention on GPUs in bfloat16 (full), XLA's elsewhere (CPU, TPU, float32)
      attention_impl="auto",
      # Per size (AOT, v5p, 32 paired examples per chip, scanned stacks): no remat needs 37.3 GiB,
      # dots_no_batch (keep the weight matmuls' outputs, recompute attention and elementwise work)
      # 12.4 GiB, full 6.3 GiB. The tiny model is too small to care.
      remat_policy=s["remat"],
      # Layers per scan iteration. tiny: straight-line code (1-2 layers; its paired step ran 22%
      # faster on a 2-core CPU than as a loop). full: a loop, for compile time.
      scan_unroll=s["unroll"],
  ))


def dvae_config(arg: str) -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        hidden_size=256, num_groups=4, blocks_per_group=2, vocab_size=8192, input_channels=3,
        decoder=True, decoder_init_size=128, output_channels=3, dtype="bfloat16",
        param_dtype="float32"))
  # tiny: 64 px images -> 8x8 codes (the tiny image encoder's grid is 4x4 at patch 16; the
  # data pipeline feeds the dVAE a half-resolution view, so 32 px -> 4x4 codes).
  return ml_collections.ConfigDict(dict(
      hidden_size=16, num_groups=4, blocks_per_group=1, vocab_size=512, input_channels=3,
      decoder=True, decoder_init_size=16, output_channels=3, dtype="float32",
      param_dtype="float32"))


def data_config(arg: str) -> ml_collections.ConfigDict:
  """The corpora mixed per step and their transforms (flava_jax/data/pipeline.py, DataConfig).

  Default corpora: the embedded corpus (built on first use, no download). A real run names its
  own, e.g. --config.data.corpora.paired.source=tfds --config.data.corpora.paired.name=
  coco_captions --config.data.corpora.paired.fields.caption=captions/text, or our own shards
  written by `python -m flava_jax.data.build` (source=array_record, paths=DIR).
  """
  full = arg == "full"
  fields = dict(image="image", caption="caption", text="text", label="label")

  def corpus(kind, weight):
    return dict(kind=kind, weight=weight, source="embedded", name=kind, split="train", paths="",
                data_dir="", fields=dict(fields))

  # FLAVA's joint-training mixture: paired 0.7, image 0.15, text 0.15.
  return ml_collections.ConfigDict(dict(
      corpora=dict(paired=corpus("paired", 0.7), image=corpus("image", 0.15),
                   text=corpus("text", 0.15)),
      vocab_file="",  # "" = the embedded vocabulary; real runs: bert-base-uncased's vocab.txt
      lowercase=True,
      cache_dir="",
      crop_scale=(0.9, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      horizontal_flip=False,
      fast_decode=False,  # True: decode big JPEGs at the scale the crop needs (faster, approximate)
      max_pixels=100_000_000,
      max_text_bytes=1 << 20,
      # BEiT block masks: 75 of 196 patches, blocks >= 16; tiny's 4x4 grid: 6 of 16, blocks >= 2.
      mask_patches=75 if full else 6,
      mask_min_block=16 if full else 2,
      mask_min_aspect=0.3,
      mlm_rate=0.15,
      mlm_mask_fraction=0.8,
      mlm_random_fraction=0.1,
      worker_count=16 if full else 0,
      worker_buffer_size=2,
      read_threads=8 if full else 2,
      read_buffer_size=64 if full else 16,
      max_consecutive_skips=10_000,
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.task = "flava"  # flava_jax/tasks/flava.py
  config.variant = arg
  config.model = model_config(arg)
  config.dvae = dvae_config(arg)
  config.seed = 0
  full = arg == "full"
  # Global batch per step (one corpus per step) and FLAVA's text lengths: paired captions 77
  # tokens, text-only corpora 512.
  config.global_batch = 8192 if full else 32
  config.paired_text_length = 77 if full else 16
  config.text_length = 512 if full else 32
  # tiny: 1000 steps at lr 3e-3 (below) and init std 0.05 (_SIZES). With FLAVA's 0.02 at width 64
  # the [CLS] outputs start almost input-independent and the contrastive loss sat at ln(batch) for
  # 300 to more than 1000 steps (held-out retrieval at chance in some runs); 0.05 is nearer the
  # fan-in scaling of 0.02 at width 768, and the loss leaves ln(batch) after ~200 steps.
  config.total_steps = 100_000 if full else 1000
  # Micro-batches per step: the gradients of global_batch / grad_accum rows at a time, one update.
  # grad_cache=True keeps every negative of the whole batch in the contrastive loss (GradCache:
  # embeddings first, then each micro-batch's backward pass); False contrasts per micro-batch.
  config.grad_accum = 1
  config.grad_cache = False
  config.log_every_steps = 100 if full else 50
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=2000 if full else 200, keep=3, async_save=True))
  # Evaluations (flava_jax/evals/; configs/eval/ runs each alone): at the end of training, and
  # every `every_steps` steps where set. Default: zero-shot retrieval on the embedded held-out
  # pairs and zero-shot classification of the embedded held-out images.
  # Each split names every field of its source, so that the command line can point it elsewhere:
  # --config.evals.retrieval.data.source=array_record --config.evals.retrieval.data.paths=DIR.
  eval_fields = {f: f for f in ("image", "caption", "text", "label", "text_pair", "answers",
                                "audio")}

  def eval_split(name):
    return dict(source="embedded", name=name, split="test", paths="", data_dir="",
                fields=dict(eval_fields))

  config.evals = ml_collections.ConfigDict(dict(
      retrieval=dict(evaluator="retrieval", every_steps=0, data=eval_split("paired")),
      zero_shot=dict(evaluator="zero_shot", every_steps=0, data=eval_split("image")),
  ))
  # Prediction slots: the masked-prediction heads run on this many positions per row, not on
  # every patch / token (0 = every position; the loss is the same). Image: the block mask's 75
  # (tiny: 6) patches. Text: the data pipeline masks at most this many tokens per row (BERT's
  # max_predictions_per_seq). Drawing 15% of 77 tokens picks more than 32 with probability 4e-9,
  # 15% of 512 more than 128 with 1.3e-9 (binomial tails, every token eligible; whole words
  # widen the paired tail somewhat); tiny: 8 of 16 and 12 of 32.
  config.loss = ml_collections.ConfigDict(dict(
      global_contrastive=1.0, mmm_image=1.0, mmm_text=1.0, itm=1.0, mim=1.0, mlm=1.0,
      itm_negative_rate=0.1, contrastive="global",
      image_prediction_slots=75 if full else 6,
      paired_text_prediction_slots=32 if full else 8,
      text_prediction_slots=128 if full else 12))
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3 if full else 3e-3, warmup_steps=10_000 if full else 40, decay="cosine",
      end_learning_rate_fraction=0.0, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.0, mu_dtype="float32",
      trainable=()))  # top-level parameter groups that train; () = all (stage configs narrow it)
  config.data = data_config(arg)
  # Where the weights start (flava_jax/warm_start.py): "" = random. Each takes a training workdir,
  # a model directory from `python -m flava_jax.convert` or a transformers directory.
  config.init = ml_collections.ConfigDict(dict(
      model_from="",  # every FLAVA parameter (e.g. a converted facebook/flava-full)
      image_from="",  # image encoder + MIM head (a configs/mim.py run)
      text_from="",   # text encoder + MLM head (a configs/mlm.py run)
      dvae_from="",   # the frozen MIM/MMM target tokenizer (a configs/dvae.py run)
  ))
  # Mesh ("data", "fsdp", "tensor"); -1 takes the remaining devices.
  config.sharding = ml_collections.ConfigDict(dict(
      mesh=dict(data=-1, fsdp=1, tensor=1),
      # Logical axis -> mesh axes. Parameter axes first, then activation axes.
      rules=[
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("heads", "tensor"),
          ("vocab", "tensor"),
          ("embed_out", None),
          ("head_dim", None),
          ("qkv", None),
          ("layers", None),
          ("position", None),
          ("token_type", None),
          ("classes", None),
          ("patch_h", None),
          ("patch_w", None),
          ("channels", None),
          ("conv_h", None),
          ("conv_w", None),
          ("conv_in", None),
          ("conv_out", None),
          ("batch", ("data", "fsdp")),
          ("length", None),
          ("act_embed", None),
          ("act_mlp", "tensor"),
          ("act_heads", "tensor"),
          ("act_head_dim", None),
          ("act_vocab", "tensor"),
      ],
  ))
  return config


def unimodal_stage(arg: str | None, corpus: str, trainable: tuple[str, ...],
                   full: dict) -> ml_collections.ConfigDict:
  """A unimodal stage (configs/mlm.py, configs/mim.py): one corpus kind, one encoder and its head
  trained, no evaluation at the end; `full` sets the stage's recipe for the full variant."""
  config = get_config(arg)
  config.data.corpora = {corpus: dict(config.data.corpora[corpus].to_dict(), weight=1.0)}
  config.optimizer.trainable = trainable
  config.evals = ml_collections.ConfigDict()
  if config.variant == "full":
    for key, value in full.items():
      section, _, field = key.rpartition(".")
      (config[section] if section else config)[field] = value
  else:
    config.total_steps = 200
    config.optimizer.warmup_steps = 20
  return config
