"""Reading and writing transformers checkpoint directories as plain numpy state dicts.

A directory written by `save_pretrained` holds config.json and the weights as model.safetensors,
sharded safetensors (model.safetensors.index.json) or the older pytorch_model.bin (optionally
sharded). Safetensors are read without PyTorch; .bin files need torch. Weights come back as
float32 numpy arrays keyed by their transformers names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"


def _to_float32(array: Any) -> np.ndarray:
  if hasattr(array, "detach"):  # torch.Tensor (bf16/fp16 included)
    array = array.detach().float().cpu().numpy()
  array = np.asarray(array)
  if array.dtype.kind == "f" and array.dtype != np.float32:
    array = array.astype(np.float32)
  return array


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    framework = "pt"  # reads bfloat16 too, which numpy cannot represent
  except ImportError:
    framework = "np"
  state = {}
  with safe_open(path, framework=framework) as f:
    for key in f.keys():
      state[key] = _to_float32(f.get_tensor(key))
  return state


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch installed "
                      "(or re-save the model with safetensors)") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: _to_float32(v) for k, v in state.items()}


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All weights of a save_pretrained directory, as float32 numpy arrays."""
  def shards(index_name: str) -> list[str]:
    with open(os.path.join(directory, index_name)) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted(set(weight_map.values()))

  if os.path.exists(os.path.join(directory, SAFETENSORS)):
    return _read_safetensors(os.path.join(directory, SAFETENSORS))
  if os.path.exists(os.path.join(directory, SAFETENSORS_INDEX)):
    state = {}
    for shard in shards(SAFETENSORS_INDEX):
      state.update(_read_safetensors(os.path.join(directory, shard)))
    return state
  if os.path.exists(os.path.join(directory, TORCH_BIN)):
    return _read_torch_bin(os.path.join(directory, TORCH_BIN))
  if os.path.exists(os.path.join(directory, TORCH_BIN_INDEX)):
    state = {}
    for shard in shards(TORCH_BIN_INDEX):
      state.update(_read_torch_bin(os.path.join(directory, shard)))
    return state
  raise FileNotFoundError(
      f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or "
      f"{TORCH_BIN_INDEX}")


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG}; is it a save_pretrained directory?")
  with open(path) as f:
    return json.load(f)


def load_source(src: Any, model_types: tuple[str, ...]
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, state dict) from a directory or an in-memory transformers model.

  The config's model_type must be one of `model_types` (checked before any weight is read).
  """
  def check(config):
    model_type = config.get("model_type")
    if model_type not in model_types:
      raise ValueError(f"expected model_type {' or '.join(map(repr, model_types))}, got "
                       f"{model_type!r}")
    return config

  if isinstance(src, (str, os.PathLike)):
    directory = os.fspath(src)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"{directory} is not a directory")
    return check(read_config(directory)), read_state_dict(directory)
  if hasattr(src, "state_dict") and hasattr(src, "config"):
    config = check(src.config.to_dict())
    config["architectures"] = [type(src).__name__]
    return config, {k: _to_float32(v) for k, v in src.state_dict().items()}
  raise TypeError(
      "src must be a save_pretrained directory or a transformers model instance, got "
      f"{type(src).__name__}")


def write_directory(directory: str, config: Any, state: Mapping[str, np.ndarray]) -> None:
  """Writes config (a transformers PretrainedConfig) and weights as model.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  config.save_pretrained(directory)
  tensors = {k: np.array(v, order="C") for k, v in state.items()}
  save_file(tensors, os.path.join(directory, SAFETENSORS), metadata={"format": "pt"})
