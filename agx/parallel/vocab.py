"""The vocab-parallel embedding lookup (Megatron's VocabParallelEmbedding), with its collectives
written out.

The table is split over `tensor` by rows (the vocabulary) and over the data-parallel axes by
columns (d_model, where FSDP or ZeRO-3 shard it). Each device gathers its rows' columns, looks up
the tokens that fall in its rows, zeros for the rest, and the tensor ranks sum what they found: a
reduce-scatter along the sequence under sequence parallelism, else an all-reduce. The backward is
their transposes: the table's gradient is scattered into each device's rows and reduce-scattered
over the axes that gathered its columns, summed over those that split only the batch or the
sequence. Left to XLA, the lookup became all-to-alls and the table's gradient an all-reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from agx.compat import shard_map
from agx.parallel.padding import axis_names, without_unit_axes


def lookup(table_VxD, ids_BxT, mesh: Mesh, table_spec: PartitionSpec, ids_spec: PartitionSpec,
           rows_spec: PartitionSpec):
    """The rows of `ids` [B, T] in `table` [V, D]: [B, T, D] laid out by `rows_spec`, whose
    sequence axis may be split over `tensor` (sequence parallelism)."""
    table_spec, ids_spec, rows_spec = (without_unit_axes(s, mesh.shape) for s in (table_spec, ids_spec, rows_spec))
    vocab_axes, column_axes = axis_names(table_spec[0]), axis_names(table_spec[1])
    summed_over = tuple(a for a in vocab_axes if a not in axis_names(rows_spec[1]))
    scattered_over = tuple(a for a in vocab_axes if a in axis_names(rows_spec[1]))

    def local(table_vxd, ids_bxt):
        table_vxD = jax.lax.all_gather(table_vxd, column_axes, axis=1, tiled=True) if column_axes else table_vxd
        v = table_vxD.shape[0]
        first = jax.lax.axis_index(vocab_axes) * v if vocab_axes else 0
        local_ids_bxt = ids_bxt - first
        mine_bxt = (local_ids_bxt >= 0) & (local_ids_bxt < v)
        rows_bxtxD = jnp.take(table_vxD, jnp.where(mine_bxt, local_ids_bxt, 0), axis=0) * mine_bxt[..., None]
        if scattered_over:
            rows_bxtxD = jax.lax.psum_scatter(rows_bxtxD, scattered_over, scatter_dimension=1, tiled=True)
        return jax.lax.psum(rows_bxtxD, summed_over) if summed_over else rows_bxtxD

    return shard_map(local, mesh, in_specs=(table_spec, ids_spec), out_specs=rows_spec)(table_VxD, ids_BxT)
