"""The caption binary and the captioning evaluator on a tiny BLIP model directory: the binary
prints what blip_generate gives for each image and reports unreadable images; the evaluator's
word measures are the shares they say they are."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import blip as blip_configs
from flava_jax import checkpoint, evaluate
from flava_jax.data import embedded, sources, transforms
from flava_jax.evals import captioning
from flava_jax.models import blip_generate
from flava_jax.models.blip import Blip, BlipConfig
from tests.processes import REPO, child_env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random tiny BLIP (one layer per stack, 32 px) saved as a model directory."""
  values = blip_configs.get_config("tiny").model.to_dict()
  for part in ("image", "text"):
    values[part].update(num_layers=1, hidden_size=32, mlp_dim=64)
  values["image"]["image_size"] = 32
  values["embed_dim"] = 16
  config = BlipConfig.from_dict(values)
  params = jax.device_get(Blip(config).init_params(jax.random.key(0)))
  path = str(tmp_path_factory.mktemp("blip_model") / "model")
  checkpoint.save_model(path, config, params)
  return path


def _images(tmp_path, count):
  source = sources.open_source(sources.SourceConfig(name="paired", split="test"), "test",
                               "paired")
  paths = []
  for i in range(count):
    paths.append(str(tmp_path / f"scene{i}.png"))
    with open(paths[-1], "wb") as f:
      f.write(source[i]["image"])
  return paths


def test_caption_binary_prints_blip_generates_captions_and_skips_bad_images(model_dir, tmp_path):
  paths = _images(tmp_path, 3)
  broken = str(tmp_path / "broken.jpg")
  with open(broken, "wb") as f:
    f.write(b"not an image")
  done = subprocess.run(
      [sys.executable, "-m", "flava_jax.caption", f"--checkpoint={model_dir}",
       f"--images={paths[0]},{broken},{tmp_path}/scene[12].png"],
      cwd=REPO, env=child_env(), capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [l.split("\t") for l in done.stdout.splitlines() if "\t" in l]
  assert [p for p, _ in lines] == [paths[0], broken, paths[1], paths[2]]
  assert lines[1][1] == "skipped: undecodable"

  ckpt = evaluate.load_checkpoint(model_dir)
  tok = evaluate.make_context(ckpt.task, jax.sharding.Mesh(jax.devices()[:1], ("data",)),
                              (), "").tokenizer
  prompt = ckpt.predict.caption_prompt(tok, "a picture of ")
  assert prompt[0] == ckpt.task.model_config.text.bos_token_id and tok.sep_id not in prompt
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = np.stack([transforms.eval_pixels(Image.open(p).convert("RGB"), 32)
                     for p in (paths[0], paths[1], paths[2])])
  tokens = blip_generate.captions(ckpt.task.model, ckpt.params,
                                  transforms.encoder_pixels(jnp.asarray(pixels)), prompt,
                                  blip_generate.BEAM).tokens
  want = [captioning.decode_caption(tok, t) for t in np.asarray(tokens)]
  assert [lines[0][1], lines[2][1], lines[3][1]] == want


def test_caption_binary_names_a_pattern_that_matches_nothing(model_dir, tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "flava_jax.caption", f"--checkpoint={model_dir}",
       f"--images={tmp_path}/nothing*.png"],
      cwd=REPO, env=child_env(), capture_output=True, text=True, check=False)
  assert done.returncode != 0 and "names no image file" in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_content_words_and_word_precision():
  words = frozenset(captioning.EMBEDDED_WORDS)
  assert captioning.content_words("Two large red circles and a blue square", words) == [
      "red", "circle", "blue", "square"]
  generated = [["red", "circle"], [], ["blue"]]
  references = [{"red", "square"}, {"red"}, {"blue"}]
  precision, naming = captioning.word_precision(generated, references)
  assert naming == 2 and precision == pytest.approx((0.5 + 1.0) / 2)


def test_decode_caption_stops_at_sep_and_drops_ids_past_the_vocabulary():
  from flava_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(embedded.vocab_file())
  ids, mask, _ = tok.encode("a red circle", 8)
  body = [int(i) for i in ids[1:int(mask.sum()) - 1]]  # without [CLS] and [SEP]
  tokens = np.asarray([tok.vocab_size, *body, tok.sep_id, 7, 8])  # [DEC]-like id first
  assert captioning.decode_caption(tok, tokens) == "a red circle"


def test_captioning_evaluator_runs_on_a_model_directory(model_dir):
  config = __import__("configs.eval.captioning", fromlist=["get_config"]).get_config()
  config.task.limit = 6
  config.task.batch_size = 8
  metrics = evaluate.run(config, model_dir)
  assert metrics["images"] == 6.0
  assert 0.0 <= metrics["other_word_precision"] <= 1.0
  assert 0.0 <= metrics["own_word_precision"] <= 1.0
  # captions are cut at [SEP]: at most max_length - the 4-token prompt
  assert 0.0 <= metrics["caption_tokens"] <= 16.0
