"""The README's embedding example runs as written, on a tiny model with its own processor."""

import os
import re

import numpy as np
from PIL import Image
from transformers import BertTokenizer, FlavaProcessor
from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example(marker: str) -> str:
  text = open(README).read()
  match = re.search(re.escape(marker) + r".*?\n```python\n(.*?)\n```", text, re.S)
  assert match, f"README has no python block after {marker}"
  return match.group(1)


def test_embed_example_runs(tiny_hf_pretraining, tmp_path):
  model_dir = tmp_path / "flava"
  tiny_hf_pretraining.save_pretrained(model_dir)
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog"]
  words += [f"word{i}" for i in range(100 - len(words))]
  tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
  size = {"height": 32, "width": 32}
  FlavaProcessor(image_processor=FlavaImageProcessorPil(size=size, crop_size=size),
                 tokenizer=tokenizer).save_pretrained(model_dir)
  image_path = tmp_path / "cat.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8)).save(image_path)

  code = _example("<!-- example:embed")
  assert '"flava-full"' in code and '"cat.jpg"' in code and "max_length=77" in code
  code = (code.replace('"flava-full"', repr(str(model_dir)))
          .replace('"cat.jpg"', repr(str(image_path)))
          .replace("max_length=77", "max_length=12"))  # the tiny model has 40 positions
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["image_embedding"].shape == (1, 24)
  assert np.isclose(float(np.linalg.norm(scope["image_embedding"])), 1.0, atol=1e-5)
  assert -1.0 <= scope["similarity"] <= 1.0
  assert scope["inputs"]["input_ids"][0, :7].tolist() == [2, 5, 6, 7, 5, 8, 3]
