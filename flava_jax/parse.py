"""Typed config sections: a ConfigDict (or a checkpoint's saved dict) -> frozen dataclasses.

Every section of a run's config is parsed once at start-up by `dataclass_from_dict`; unknown
fields and ill-typed values fail there, naming the field (`model.image.hidden_size`), so a wrong
config never reaches a trace. Nothing below the start-up reads the raw ConfigDict again.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

_T = TypeVar("_T")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


def as_dict(values: Any) -> Any:
  """A ConfigDict as a plain dict (other values unchanged)."""
  return values.to_dict() if hasattr(values, "to_dict") else values


def dataclass_from_dict(cls: type[_T], values: Mapping[str, Any], prefix: str) -> _T:
  """Builds dataclass `cls` from a mapping; unknown fields and wrong types are named errors."""
  values = as_dict(values)
  if not isinstance(values, Mapping):
    raise TypeError(f"{prefix} must be a mapping, got {type(values).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"unknown field(s) {', '.join(prefix + '.' + u for u in unknown)}; "
        f"known fields of {prefix}: {', '.join(sorted(fields))}")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    path = f"{prefix}.{name}"
    if dataclasses.is_dataclass(hint):
      kwargs[name] = value if isinstance(value, hint) else dataclass_from_dict(hint, value, path)
      continue
    kwargs[name] = _coerce(path, value, hint)
  return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
  if hint is bool:
    if not isinstance(value, bool):
      raise TypeError(f"{path} must be a bool, got {value!r}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{path} must be an int, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError(f"{path} must be a number, got {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise TypeError(f"{path} must be a string, got {value!r}")
    return value
  return value
