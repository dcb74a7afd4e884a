"""Parameter count of a parameter tree (the trainer's start-up line, the converter)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def num_parameters(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
