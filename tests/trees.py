"""Comparing two pytrees leaf by leaf, without zip()'s silent truncation.

Walking `zip(jax.tree.leaves(a), jax.tree.leaves(b))` stops at the shorter list, so a leaf one
tree lacks is never compared and the test passes. These helpers first match the trees' key paths
(and, for values, shapes and dtypes), failing on the first path that differs, and only then
compare values, naming the leaf that differs.

    assert_trees_equal(params, reference)                 # bit-exact
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-7)
    trees_equal(a, b)                                     # same paths asserted; True if all equal
    for path, value, spec in matched_leaves(shapes, shardings):  # a tree against a tree of specs
      ...
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def _flatten(tree: Any, is_leaf: Callable[[Any], bool] | None) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def matched_leaves(a: Any, b: Any, is_leaf: Callable[[Any], bool] | None = None
                   ) -> list[tuple[str, Any, Any]]:
  """[(key path, leaf of a, leaf of b)] in flattening order, once both trees are known to have
  the same key paths; otherwise an AssertionError naming the first path only one of them has.

  Dicts and FrozenDicts with the same keys match (paths, not node types, are compared), so a
  restored checkpoint (plain dicts) compares with a live state. `is_leaf` applies to both trees
  (e.g. to stop at PartitionSpecs or flax's Partitioned boxes).
  """
  flat_a, flat_b = _flatten(a, is_leaf), _flatten(b, is_leaf)
  paths_a, paths_b = [p for p, _ in flat_a], [p for p, _ in flat_b]
  if paths_a != paths_b:
    in_a, in_b = set(paths_a), set(paths_b)
    only_a = [p for p in paths_a if p not in in_b]
    only_b = [p for p in paths_b if p not in in_a]
    if only_a or only_b:
      first = (f"first leaf only in the first tree: {only_a[0]}" if only_a else
               f"first leaf only in the second tree: {only_b[0]}")
      raise AssertionError(
          f"the trees have different leaves ({len(paths_a)} vs {len(paths_b)}; "
          f"{len(only_a)} only in the first, {len(only_b)} only in the second); {first}")
    position = next(i for i, (x, y) in enumerate(zip(paths_a, paths_b)) if x != y)
    raise AssertionError(f"the trees hold the same leaves in another order: leaf {position} is "
                         f"{paths_a[position]} in the first, {paths_b[position]} in the second")
  return [(path, x, y) for (path, x), (_, y) in zip(flat_a, flat_b)]


def _dtype(leaf: Any) -> np.dtype:
  dtype = getattr(leaf, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def _matched_arrays(a: Any, b: Any, check_dtype: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """matched_leaves, then each pair of leaves with the same shape (and dtype), as host arrays."""
  out = []
  for path, x, y in matched_leaves(a, b):
    if np.shape(x) != np.shape(y):
      raise AssertionError(f"leaf {path}: shape {np.shape(x)} vs {np.shape(y)}")
    if check_dtype and _dtype(x) != _dtype(y):
      raise AssertionError(f"leaf {path}: dtype {_dtype(x)} vs {_dtype(y)}")
    out.append((path, np.asarray(x), np.asarray(y)))
  return out


def assert_trees_equal(actual: Any, expected: Any, check_dtype: bool = True) -> None:
  """Same key paths, shapes, dtypes (unless check_dtype=False) and bit-identical values."""
  for path, x, y in _matched_arrays(actual, expected, check_dtype):
    np.testing.assert_array_equal(x, y, err_msg=f"leaf {path}")


def assert_trees_close(actual: Any, expected: Any, rtol: float = 1e-7, atol: float = 0.0,
                       check_dtype: bool = True) -> None:
  """Same key paths, shapes and dtypes; values within np.testing.assert_allclose's tolerance
  (|actual - expected| <= atol + rtol * |expected|)."""
  for path, x, y in _matched_arrays(actual, expected, check_dtype):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"leaf {path}")


def trees_equal(a: Any, b: Any) -> bool:
  """Whether every leaf of a equals b's (shapes and dtypes too); the trees must have the same key
  paths (an AssertionError otherwise: a missing leaf is a broken test, not 'different')."""
  return all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
             for _, x, y in _matched_arrays(a, b, check_dtype=False))


def assert_metrics_close(actual: Any, expected: Any, where: Any = None, rel: float = 1e-5,
                         same_names: bool = True) -> None:
  """Every metric of `expected` within rel * max(1, |expected|) of `actual`'s (a sharded step's
  figures against one device's); same_names: and no other metric."""
  if same_names:
    assert set(actual) == set(expected), where
  for name in expected:
    want = float(expected[name])
    assert abs(float(actual[name]) - want) <= rel * max(1.0, abs(want)), (where, name)
