"""Captions of images by a model with a captioning decoder (BLIP).

    python -m flava_jax.caption --checkpoint=WORKDIR_OR_MODEL_DIR --images=a.jpg,b.png,dir/
    python -m flava_jax.caption --checkpoint=DIR --images='photos/*.jpg' --method=sample

--checkpoint: a training workdir (its newest checkpoint) or a model directory written by
`python -m flava_jax.convert`. --images: files, folders (their image files) and glob patterns,
comma-separated. Prints one line per image, `PATH<TAB>caption`, in the order given; an image that
cannot be read is reported as skipped with its reason, and the others are still captioned.
Decoding: the prompt ("a picture of "), then beam search (3 beams, max_length 20 and min_length
5 counting the prompt, the reference's captioning) or nucleus sampling (--method=sample: top-p
0.9, repetition penalty 1.1, deterministic under --seed). The images are batch-sharded over the
devices (and processes) of the job.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from absl import app, flags

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

flags.DEFINE_string("checkpoint", None, "a training workdir or a converted model directory")
flags.DEFINE_list("images", [], "image files, folders and glob patterns")
flags.DEFINE_string("prompt", "a picture of ", "the text every caption starts with")
flags.DEFINE_enum("method", "beam", ["beam", "greedy", "sample"], "how to decode")
flags.DEFINE_integer("max_length", 20, "tokens per caption, the prompt's included")
flags.DEFINE_integer("min_length", 5, "no [SEP] before this many tokens, the prompt's included")
flags.DEFINE_integer("num_beams", 3, "beam search's beams")
flags.DEFINE_float("top_p", 0.9, "nucleus sampling's probability mass")
flags.DEFINE_float("repetition_penalty", None,
                   "default: 1.0 for beam search and greedy, 1.1 for sampling (the reference's)")
flags.DEFINE_integer("seed", 0, "sampling's key")
flags.DEFINE_integer("batch_size", 64, "images per batch (global)")
flags.DEFINE_string("vocab_file", "", "the model's vocab.txt (default: the checkpoint's)")
flags.DEFINE_bool("multiprocess", False, "call jax.distributed.initialize() (TPU pods, SLURM)")


def image_paths(patterns: Sequence[str]) -> list[str]:
  """Files, folders (their image files, sorted) and glob patterns -> paths, in order. A pattern
  that matches nothing is an error naming it."""
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                     if f.lower().endswith(IMAGE_SUFFIXES))
    elif any(c in pattern for c in "*?["):
      found = sorted(glob.glob(pattern))
    else:
      found = [pattern] if os.path.exists(pattern) else []
    if not found:
      raise ValueError(f"--images: {pattern!r} names no image file")
    paths.extend(found)
  return paths


def caption_images(ckpt, paths: Sequence[str], settings_fields: dict, prompt_text: str,
                   seed: int, batch_size: int, vocab_file: str = "") -> list[tuple[str, str]]:
  """[(path, caption or "skipped: reason")] for every path, in order."""
  import jax  # pylint: disable=import-outside-toplevel
  from flava_jax import evaluate, sharding  # pylint: disable=import-outside-toplevel
  from flava_jax.evals import captioning  # pylint: disable=import-outside-toplevel
  from flava_jax.evals.features import INDEX_KEY  # pylint: disable=import-outside-toplevel

  predict = ckpt.predict
  if not hasattr(predict, "caption"):
    raise ValueError(f"--checkpoint: a {ckpt.task.NAME} model has no captioning decoder")
  mesh = sharding.make_mesh({"data": -1})
  ctx = evaluate.make_context(ckpt.task, mesh, (("batch", ("data", "fsdp")),),
                              evaluate.vocabulary(ckpt, vocab_file, "--vocab_file"))
  settings = predict.caption_settings(**settings_fields)
  prompt = predict.caption_prompt(ctx.tokenizer, prompt_text)
  key = jax.random.key(seed)
  fn = lambda p, b: {"tokens": predict.caption(  # noqa: E731
      p, b, prompt, settings, jax.random.fold_in(key, b[INDEX_KEY][0]))}

  def read(i):
    with open(paths[i], "rb") as f:
      return ctx.image_row(f.read())

  errors = {}

  def prepare(i):
    try:
      return read(i)
    except Exception as e:  # pylint: disable=broad-except  (recorded per image, printed)
      errors[i] = getattr(e, "reason", type(e).__name__)
      raise

  out, _ = ctx.map_split(len(paths), prepare, fn, ctx.place(ckpt.params), batch_size)
  texts = {i: captioning.decode_caption(ctx.tokenizer, t)
           for i, t in zip(out[INDEX_KEY].tolist(), out["tokens"])}
  return [(p, texts[i] if i in texts else f"skipped: {errors.get(i, 'unreadable')}")
          for i, p in enumerate(paths)]


def main(argv: Sequence[str]) -> None:
  from flava_jax import binary, evaluate, multihost  # pylint: disable=import-outside-toplevel
  binary.start(argv)
  flag = flags.FLAGS
  if not flag.checkpoint:
    raise app.UsageError("--checkpoint is required")
  try:
    paths = image_paths(flag.images)
    if not paths:
      raise ValueError("--images names no image")
    penalty = flag.repetition_penalty
    if penalty is None:
      penalty = 1.1 if flag.method == "sample" else 1.0
    fields = dict(method=flag.method, max_length=flag.max_length, min_length=flag.min_length,
                  num_beams=flag.num_beams, top_p=flag.top_p if flag.method == "sample" else 1.0,
                  repetition_penalty=penalty)
    ckpt = evaluate.load_checkpoint(flag.checkpoint)
    lines = caption_images(ckpt, paths, fields, flag.prompt, flag.seed, flag.batch_size,
                           flag.vocab_file)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from None
  if multihost.is_primary():
    for path, text in lines:
      print(f"{path}\t{text}", flush=True)


if __name__ == "__main__":
  app.run(main)
