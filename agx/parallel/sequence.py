"""Sequence parallelism (Korthikanti et al. 2022) with its collectives written out.

With `mesh.sequence_parallel` the residual stream between the tensor-parallel matmuls is split over
`tensor` along the sequence ('act_length'). A column-parallel matmul needs the whole sequence: an
all-gather before it. A row-parallel matmul leaves each tensor rank a partial sum: a reduce-scatter
after it. The backward mirrors them: the all-gather's gradient is a reduce-scatter, the
reduce-scatter's an all-gather. Left to XLA's partitioner, every reduce-scatter appears as an
all-reduce and a slice, twice the bytes, on a backend without the pass that fuses them (the CPU's
has none). Here they are written as what they are, in shard_maps whose transposes are the backward's.

The partial sums must reach the shard_map unreduced, and XLA's partitioner reduces any partial sum
that crosses into one. So a value that each tensor rank holds a copy of (the gathered sequence) or a
part of (the row-parallel partial sums) is a *stack* here: a leading axis J on `tensor`, one slice
per rank. The model's matmuls take each slice against its rank's columns (or rows), batched over J,
which keeps them, and their gradients, local to the rank until this file's collectives.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from agx.compat import shard_map

AXIS = "tensor"


def gather(x_BxTxD, mesh: Mesh, split: PartitionSpec, whole: PartitionSpec):
    """[B, T, D] split over `tensor` along T (`split`) -> the stack [J, B, T, D] of J whole copies,
    J on `tensor` (`whole`: the copies' spec). Its gradient is one reduce-scatter of the J partials."""
    local = lambda x_bxtxD: jax.lax.all_gather(x_bxtxD, AXIS, axis=1, tiled=True)[None]
    return shard_map(local, mesh, in_specs=(split,), out_specs=PartitionSpec(AXIS, *whole))(x_BxTxD)


def scatter(y_JxBxTxD, mesh: Mesh, whole: PartitionSpec, split: PartitionSpec):
    """The stack of J partial sums [J, B, T, D], J on `tensor` -> their sum [B, T, D], split over
    `tensor` along T (`split`): one reduce-scatter. Its gradient is one all-gather."""
    local = lambda y_1xbxTxD: jax.lax.psum_scatter(y_1xbxTxD[0], AXIS, scatter_dimension=1, tiled=True)
    return shard_map(local, mesh, in_specs=(PartitionSpec(AXIS, *whole),), out_specs=split)(y_JxBxTxD)
