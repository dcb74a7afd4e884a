"""Model checkpoints on disk: the configs as JSON beside an Orbax checkpoint of the parameters.

Layout of a model directory (what `python -m flava_jax.convert` writes and training can start from):

    DIR/flava_jax_model.json   {"task": "flava" | "blip" | "audio", "model": the family's
                                config fields, "dvae": DVAEConfig fields or null}
    DIR/params/                Orbax StandardCheckpointer: {"model": params[, "dvae": params]}

"task" names the model family (FlavaConfig -> FlavaModel, BlipConfig -> Blip, AudioConfig ->
AudioEncoder: a wav2vec 2.0-style audio encoder on its own, converted from a Wav2Vec2Model);
directories written before it existed are FLAVA's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flava_jax.models.audio import AudioConfig, AudioEncoder
from flava_jax.models.blip import Blip, BlipConfig
from flava_jax.models.config import ComputeConfig, DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE
from flava_jax.models.flava import FlavaModel

MODEL_JSON = "flava_jax_model.json"
PARAMS_DIR = "params"
# The model families a directory may hold: task name -> (config class, model class).
FAMILIES = {"flava": (FlavaConfig, FlavaModel), "blip": (BlipConfig, Blip),
            "audio": (AudioConfig, lambda config: AudioEncoder(config, ComputeConfig()))}


@dataclasses.dataclass
class LoadedModel:
  model: FlavaModel | Blip | AudioEncoder
  params: Any
  dvae: DVAE | None = None
  dvae_params: Any = None
  task: str = "flava"


def task_of(config: Any) -> str:
  """The family name of a model config ("flava", "blip")."""
  for task, (config_class, _) in FAMILIES.items():
    if isinstance(config, config_class):
      return task
  raise TypeError(f"no model family has a config of type {type(config).__name__}")


def save_model(directory: str, config: FlavaConfig | BlipConfig | AudioConfig, params: Any,
               dvae_config: DVAEConfig | None = None, dvae_params: Any = None) -> None:
  """Writes configs and parameters; refuses to overwrite an existing model directory."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, MODEL_JSON)):
    raise FileExistsError(f"{directory} already holds a model; choose a new --out")
  os.makedirs(directory, exist_ok=True)
  tree = {"model": params}
  if dvae_params is not None:
    tree["dvae"] = dvae_params
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), jax.tree_util.tree_map(np.asarray, tree))
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump({"task": task_of(config), "model": config.to_dict(),
               "dvae": dvae_config.to_dict() if dvae_config is not None else None}, f, indent=2)


def load_model(directory: str, **config_overrides: Any) -> LoadedModel:
  """Reads a directory written by save_model. Overrides (dtype, attention_impl, ...) apply to the
  FLAVA config; they must not change parameter shapes."""
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory} is not a flava_jax model directory (no {MODEL_JSON})")
  with open(meta_path) as f:
    meta = json.load(f)
  task = meta.get("task", "flava")
  if task not in FAMILIES:
    raise ValueError(f"{meta_path}: unknown task {task!r} (known: {', '.join(FAMILIES)})")
  config_class, model_class = FAMILIES[task]
  config = config_class.from_dict(meta["model"])
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides).validate()
  dvae_config = DVAEConfig.from_dict(meta["dvae"]) if meta.get("dvae") else None
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR))
  model = model_class(config)
  dvae = DVAE(dvae_config) if dvae_config is not None else None
  return LoadedModel(model=model, params=tree["model"], dvae=dvae,
                     dvae_params=tree.get("dvae") if dvae is not None else None, task=task)
