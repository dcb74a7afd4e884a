"""Training the dVAE image tokenizer (the dvae task, flava_jax/tasks/dvae.py).

    python -m flava_jax.main --config=configs/dvae.py --workdir=/tmp/flava_dvae
    python -m flava_jax.main --config.init.dvae_from=/tmp/flava_dvae   # its codes as MIM targets
    --config=configs/dvae.py:omni   tiny, on 64 px views: the tri-modal tiny model's 8 x 8 codes
                                    (configs/omni.py --config.init.dvae_from=WORKDIR)

`config.model` only fixes the image geometry: the dVAE trains on the views FLAVA will feed it
(patch grid x 8 pixels: 112 px for FLAVA-full, 32 px for tiny), cut from the image and paired
corpora by the same pipeline. `full` follows DALL-E's dVAE recipe (batch 512, Adam lr 1e-4 with
cosine decay, KL weight ramped 0 -> 6.6 over 5000 steps, temperature 1 -> 1/16 over 150K steps,
3M steps); tiny trains in about a minute on 2 CPU cores.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flava  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  omni = arg == "omni"
  base = flava.get_config("tiny" if omni else arg)
  if omni:  # configs/omni.py:tiny's image geometry: 8 x 8 patches of 64 px -> 64 px views
    base.model.image.patch_size = 8
  full = base.variant == "full"
  config = ml_collections.ConfigDict()
  config.task = "dvae"
  config.variant = "omni" if omni else base.variant
  config.model = base.model  # image geometry (and the text settings the pipeline reads)
  config.dvae = base.dvae
  config.seed = 0
  config.global_batch = 512 if full else 64
  config.paired_text_length = base.paired_text_length
  config.text_length = base.text_length
  config.total_steps = 3_000_000 if full else 400
  config.log_every_steps = 100 if full else 50
  config.grad_accum = 1
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=5000 if full else 200, keep=3, async_save=True))
  config.dvae_training = ml_collections.ConfigDict(dict(
      kl_weight=6.6, kl_warmup_steps=5000 if full else 100,
      temperature_start=1.0, temperature_end=1 / 16,
      temperature_steps=150_000 if full else 300, eval_examples=256))
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4 if full else 3e-3, warmup_steps=0 if full else 20, decay="cosine",
      end_learning_rate_fraction=0.0125, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.0, mu_dtype="float32", trainable=()))
  data = base.data
  # Images only: the image corpus and the images of the paired corpus, equally.
  data.corpora = {"image": dict(data.corpora.image.to_dict(), weight=0.5),
                  "paired": dict(data.corpora.paired.to_dict(), weight=0.5)}
  config.data = data
  config.sharding = base.sharding
  # At the end: held-out reconstruction (MSE, PSNR, codebook use) of the embedded test images.
  config.evals = ml_collections.ConfigDict(dict(
      reconstruction=dict(evaluator="reconstruction", every_steps=0, limit=256,
                          data=dict(base.evals.zero_shot.data.to_dict(), name="image"))))
  # Warm starts: model_from (a dVAE workdir or a model directory holding one).
  config.init = ml_collections.ConfigDict(dict(model_from=""))
  return config
