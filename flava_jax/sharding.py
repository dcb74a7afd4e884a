"""The device mesh and the mapping from logical axis names to mesh axes.

One mesh, ("data", "fsdp", "tensor"), sized by config (-1 takes the remaining devices). Parameters
and activations carry logical names (flava_jax.models.transformer); `config.sharding.rules` maps
them to mesh axes, so a sharding layout is a config decision. The batch is split over
("data", "fsdp"); parameters and optimizer state are split over "fsdp" by the `embed` rule (FSDP),
and over "tensor" by the mlp/heads/vocab rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")
Rules = tuple[tuple[str, Any], ...]


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Fills the one -1 entry so that the product is num_devices; errors name the field."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axis sharding.mesh.{sorted(unknown)[0]}; axes: {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError("sharding.mesh: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"sharding.mesh sizes must be positive or -1, got {dict(sizes)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"sharding.mesh {dict(sizes)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"sharding.mesh {dict(sizes)} needs {math.prod(shape)} devices, "
                     f"{num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
  """Config rules (lists from a ConfigDict) as the tuple of pairs flax expects."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding.rules entries are (logical name, mesh axes); got {rule!r}")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"sharding.rules maps {name!r} to unknown mesh axis {axis!r}")
    out.append((name, axes))
  return tuple(out)


def logical_to_shardings(logical: Any, mesh: Mesh, rules: Rules) -> Any:
  """A tree of PartitionSpecs of logical names -> NamedShardings on `mesh`."""
  # Spec by spec: flax's tree-level helper would read optax's empty MaskedNode (a tuple) as a
  # spec, and frozen parameter groups leave those in the optimizer state.
  return jax.tree_util.tree_map(
      lambda spec: nn.logical_to_mesh_sharding(spec, mesh, list(rules)), logical,
      is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def describe(shardings: Any) -> dict[str, str]:
  """{param path: str(spec)} (mesh axes per dimension) for logs, the AOT tool and golden files."""
  out = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    out[jax.tree_util.keystr(path)] = str(tuple(sharding.spec))
  return out
