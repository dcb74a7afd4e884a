"""Global contrastive loss (GC): symmetric InfoNCE over the global batch.

Inside jit the embeddings are global arrays whose batch axis is sharded over the data-parallel
mesh axes. `global_contrastive_loss` all-gathers them explicitly in a shard_map, so every device
holds only its [local_batch, global_batch] block of logits; the gather's transpose (a reduce-
scatter) carries the gradients back to the devices that own each embedding. The result equals the
single-device loss over the whole batch. `local_contrastive_loss` skips the gather (each device
contrasts its own rows only), for the ablation FLAVA reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from flava_jax.losses.masked import token_cross_entropy
from flava_jax.sharding import DATA_AXES

Array = jax.Array


def _block_loss(image: Array, text: Array, all_image: Array, all_text: Array, scale: Array,
                row_weights: Array, first_row: Array) -> tuple[Array, Array, Array]:
  """Weighted CE sums of this block's rows, both directions, and the weight total.

  image/text [b, D] are this block's rows; all_image/all_text [N, D] the columns; labels are the
  columns first_row .. first_row + b - 1.
  """
  labels = first_row + jnp.arange(image.shape[0])
  logits_per_image = jnp.einsum("bd,nd->bn", image, all_text,
                                preferred_element_type=jnp.float32) * scale
  logits_per_text = jnp.einsum("bd,nd->bn", text, all_image,
                               preferred_element_type=jnp.float32) * scale
  w = row_weights.astype(jnp.float32)
  return (jnp.sum(w * token_cross_entropy(logits_per_image, labels)),
          jnp.sum(w * token_cross_entropy(logits_per_text, labels)), jnp.sum(w))


def _finish(image_sum: Array, text_sum: Array, total: Array) -> Array:
  total = jnp.maximum(total, 1e-9)
  return 0.5 * (image_sum / total + text_sum / total)


def contrastive_loss_single(image: Array, text: Array, logit_scale: Array,
                            row_weights: Array | None = None) -> Array:
  """The loss over one whole batch with no mesh (also the reference for the sharded versions)."""
  if row_weights is None:
    row_weights = jnp.ones(image.shape[:1], jnp.float32)
  scale = jnp.exp(logit_scale.astype(jnp.float32))
  return _finish(*_block_loss(image, text, image, text, scale, row_weights, jnp.int32(0)))


def _data_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[str, ...]:
  return tuple(a for a in axes if a in mesh.axis_names)


def _resolve_mesh(mesh: Mesh | None, axes: Sequence[str]):
  """The given mesh, else the one set with jax.set_mesh; None when there is no data parallelism."""
  if mesh is None:
    ambient = jax.sharding.get_abstract_mesh()
    mesh = None if ambient.empty else ambient
  if mesh is None or not _data_axes(mesh, axes):
    return None
  if all(mesh.shape[a] == 1 for a in _data_axes(mesh, axes)):
    return None
  return mesh


def _sharded_loss(image: Array, text: Array, logit_scale: Array, row_weights: Array | None,
                  mesh: Mesh | None, data_axes: Sequence[str], gather: bool) -> Array:
  if row_weights is None:
    row_weights = jnp.ones(image.shape[:1], jnp.float32)
  mesh = _resolve_mesh(mesh, data_axes)
  if mesh is None:
    return contrastive_loss_single(image, text, logit_scale, row_weights)
  axes = _data_axes(mesh, data_axes)
  batch = P(axes)

  def per_device(image, text, logit_scale, row_weights):
    if gather:
      columns_image = jax.lax.all_gather(image, axes, axis=0, tiled=True)  # [B, D]
      columns_text = jax.lax.all_gather(text, axes, axis=0, tiled=True)
      first_row = jax.lax.axis_index(axes) * image.shape[0]
    else:
      columns_image, columns_text, first_row = image, text, jnp.int32(0)
    sums = _block_loss(image, text, columns_image, columns_text, jnp.exp(logit_scale),
                       row_weights, first_row)
    return _finish(*(jax.lax.psum(s, axes) for s in sums))

  return jax.shard_map(per_device, mesh=mesh, in_specs=(batch, batch, P(), batch),
                       out_specs=P())(image, text, logit_scale.astype(jnp.float32), row_weights)


def global_contrastive_loss(image: Array, text: Array, logit_scale: Array,
                            row_weights: Array | None = None, *, mesh: Mesh | None = None,
                            data_axes: Sequence[str] = DATA_AXES) -> Array:
  """GC over the global batch. image/text: [B, D] L2-normalised, batch sharded over data_axes;
  row_weights [B] drop rows (ITM negatives) while keeping their columns; logit_scale is the log
  temperature (exp'd here). `mesh` defaults to the one set with jax.set_mesh; without one (or
  without data parallelism) the loss is computed directly."""
  return _sharded_loss(image, text, logit_scale, row_weights, mesh, data_axes, gather=True)


def local_contrastive_loss(image: Array, text: Array, logit_scale: Array,
                           row_weights: Array | None = None, *, mesh: Mesh | None = None,
                           data_axes: Sequence[str] = DATA_AXES) -> Array:
  """The ablation: each data-parallel shard contrasts its own rows only (no gather); the loss is
  the weighted mean over all rows of those per-shard losses."""
  return _sharded_loss(image, text, logit_scale, row_weights, mesh, data_axes, gather=False)

