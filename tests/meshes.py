"""Checks of a task's step on a mesh against one device."""

import jax

from flava_jax import run_once, sharding, train
from tests.trees import matched_leaves


def loss_and_grads(exp, kind: str, state, frozen, batch, local_batch: int, rng):
  """The step's metrics and gradients on `exp`'s mesh (train.make_grad_step, compiled once, as a
  test compiles it), as host arrays; each gradient must come out in its parameter's sharding."""
  step = train.make_grad_step(exp.task, kind, exp.mesh, exp.rules, exp.state_shardings,
                              local_batch, compiler_options=run_once.compiler_options())
  metrics, grads = step(jax.device_put(state, exp.state_shardings),
                        None if frozen is None else jax.device_put(
                            frozen, sharding.replicated(exp.mesh)),
                        jax.device_put(batch, sharding.batch_sharding(exp.mesh)), rng)
  for path, leaf, want in matched_leaves(grads, exp.state_shardings.params):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
  return jax.device_get(metrics), jax.device_get(grads)
