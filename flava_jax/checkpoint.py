"""Model checkpoints on disk: the configs as JSON beside an Orbax checkpoint of the parameters.

Layout of a model directory (what `python -m flava_jax.convert` writes and training can start from):

    DIR/flava_jax_model.json   {"model": FlavaConfig fields, "dvae": DVAEConfig fields or null}
    DIR/params/                Orbax StandardCheckpointer: {"model": params[, "dvae": params]}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flava_jax.models.config import DVAEConfig, FlavaConfig
from flava_jax.models.dvae import DVAE
from flava_jax.models.flava import FlavaModel

MODEL_JSON = "flava_jax_model.json"
PARAMS_DIR = "params"


@dataclasses.dataclass
class LoadedModel:
  model: FlavaModel
  params: Any
  dvae: DVAE | None = None
  dvae_params: Any = None


def save_model(directory: str, config: FlavaConfig, params: Any,
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
    json.dump({"model": config.to_dict(),
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
  config = FlavaConfig.from_dict(meta["model"])
  if config_overrides:
    config = config.replace(**config_overrides)
  dvae_config = DVAEConfig.from_dict(meta["dvae"]) if meta.get("dvae") else None
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR))
  model = FlavaModel(config)
  dvae = DVAE(dvae_config) if dvae_config is not None else None
  return LoadedModel(model=model, params=tree["model"], dvae=dvae,
                     dvae_params=tree.get("dvae") if dvae is not None else None)
