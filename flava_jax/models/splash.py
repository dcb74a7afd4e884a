"""Splash attention (a Pallas TPU flash-attention kernel) for `model.attention_impl="splash"`.

The kernel works on blocks of 128 positions, so sequences are padded up to a multiple of 128
(ViT's 197 tokens to 256, captions of 77 to 128, the fused 275 to 384) and padding, ours and the
batch's, is expressed as segment ids: real positions are segment 1 and attend to real keys only,
exactly as the masked softmax does; padded positions are segment 0 and attend among themselves,
so their outputs (which nothing reads: no loss weights a padded position, no real query attends
to one) differ from the XLA path's. Under a mesh the kernel runs per device in a shard_map over
the batch and head axes (a Pallas call has no partitioning rule of its own); `interpret=True`
runs it with Pallas' interpreter on any backend (tests on CPU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
BLOCK = 128  # the kernel's block size along the sequence


def _kernel(heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernels, splash_attention_mask as masks)
  mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(heads)])
  block = min(BLOCK, length)
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  return kernels.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                 interpret=interpret), kernels.SegmentIds


def _local_attention(query: Array, key: Array, value: Array, segments: Array,
                     interpret: bool) -> Array:
  """One device's [b, n, T, H] blocks (T a multiple of BLOCK) and segments [b, T]."""
  # Built per trace, not cached: the kernel holds arrays made under the trace that builds it.
  kernel, segment_ids = _kernel(query.shape[1], query.shape[2], interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s)))(
      query, key, value, segments)


def splash_attention(query: Array, key: Array, value: Array, mask: Array | None,
                     interpret: bool = False) -> Array:
  """Softmax self-attention over [B, T, N, H] tensors; mask [B, T] True for real keys (or None)."""
  batch, length, heads, head_dim = query.shape
  if key.shape[1] != length:
    raise ValueError("splash attention is self-attention: queries and keys of one length")
  padded = -(-length // BLOCK) * BLOCK
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))

  def blocks(x):  # [B, T, N, H] -> [B, N, T', H]
    return jnp.swapaxes(jnp.pad(x, pad), 1, 2)

  real = jnp.ones((batch, length), jnp.int32) if mask is None else mask.astype(jnp.int32)
  segments = jnp.pad(real, ((0, 0), (0, padded - length)))
  args = (blocks(query * jnp.asarray(head_dim**-0.5, query.dtype)), blocks(key), blocks(value),
          segments)
  local = functools.partial(_local_attention, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_heads"))
    spec = P(batch_axes, head_axes, None, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes, None)),
                          out_specs=spec, check_vma=False)
  out = local(*args)  # [B, N, T', H]
  return jnp.swapaxes(out, 1, 2)[:, :length]
