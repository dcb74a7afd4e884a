"""Tasks by name: `config.task` picks one (flava when absent, as in configs written before the
field existed). A task's module is imported on first use.

    task = tasks.build(config)        # parsed once; errors name the field
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from flava_jax.tasks.base import GradCacheSplit, LossOutput, StepContext, Task

# name -> "module:class". A new family adds one line here (and its module, config and model).
REGISTRY = {
    "flava": "flava_jax.tasks.flava:FlavaTask",
    "dvae": "flava_jax.tasks.dvae:DVAETask",
    "clip": "flava_jax.tasks.clip:ClipTask",
    "blip": "flava_jax.tasks.blip:BlipTask",
    "audio_text": "flava_jax.tasks.audio_text:AudioTextTask",
    "omni": "flava_jax.tasks.omni:OmniTask",
}
DEFAULT = "flava"


def task_name(config: Mapping[str, Any]) -> str:
  name = config.get("task", DEFAULT) if hasattr(config, "get") else DEFAULT
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"config.task={name!r} is not one of {sorted(REGISTRY)}")
  return name


def task_class(name: str) -> type[Task]:
  module, _, cls = REGISTRY[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def build(config: Mapping[str, Any]) -> Task:
  """The task `config.task` names, with its config sections parsed."""
  return task_class(task_name(config))(config)


def for_converted_model(model_config: Any, family: str = "flava") -> Task:
  """The task of a model directory without a training config (converted from transformers or
  by `python -m flava_jax.convert`): its family's (`family`: the directory's recorded task)."""
  return task_class(family).for_model(model_config)


def for_run_config(run: Mapping[str, Any], field: str = "--checkpoint") -> Task:
  """The task a workdir's run_config.json describes; its evaluators need its predict functions."""
  try:
    return build(run)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{field}: the workdir's run config does not describe a task this code "
                     f"builds ({type(e).__name__}: {e})") from None


__all__ = ["GradCacheSplit", "LossOutput", "REGISTRY", "StepContext", "Task", "build",
           "for_converted_model", "for_run_config", "task_class", "task_name"]
