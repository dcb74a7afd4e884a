"""Test set-up: 8 fake CPU devices, float32 matmuls, and tiny transformers reference models."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

TINY_HF = dict(
    image_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, image_size=32, patch_size=8, vocab_size=64),
    text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=40),
    multimodal_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
    image_codebook_config=dict(hidden_size=8, vocab_size=64, num_blocks_per_group=1),
    hidden_size=32, projection_dim=24)


def randomize_(model, seed: int = 0):
  """Redraws every weight (biases, LayerNorms, [CLS]/[MASK]/position tokens included), so no
  parameter sits at a zero/one initial value where a mapping mistake could hide."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("logit_scale"):
        p.copy_(torch.tensor(2.3))
      elif p.ndim >= 2 and p.shape[0] > 1:  # weight matrices and conv kernels: unit-variance out
        p.copy_(noise / (p.numel() / p.shape[0]) ** 0.5)
      elif "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:  # biases and [1, 1, D] tokens
        p.copy_(0.1 * noise)
  return model


@pytest.fixture(scope="session")
def tiny_hf_pretraining():
  """A randomly initialised tiny transformers FlavaForPreTraining (with image codebook)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import FlavaConfig, FlavaForPreTraining  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = FlavaForPreTraining(FlavaConfig(**TINY_HF)).eval()
  return randomize_(model)


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_pretraining, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_flava")
  tiny_hf_pretraining.save_pretrained(path)
  return str(path)
