"""The vocab-parallel embedding lookup (Megatron's VocabParallelEmbedding), with its collectives
written out.

The table is split over `tensor` by rows (the vocabulary) and over the data-parallel axes by
columns (d_model, where FSDP or ZeRO-3 shard it). Each device gathers its rows' columns, looks up
the tokens that fall in its rows, zeros for the rest, and the tensor ranks sum what they found: a
reduce-scatter along the sequence under sequence parallelism, else an all-reduce. The backward is
their transposes: the table's gradient is scattered into each device's rows and reduce-scattered
over the axes that gathered its columns, summed over those that split only the batch or the
sequence. Left to XLA, the lookup became all-to-alls and the table's gradient an all-reduce.
Without sequence parallelism the tensor ranks' sum is left to XLA: an all-reduce either way.
Columns that their axes do not divide (padded sharding) are padded before the gather and cut after
it, as agx.parallel.weight_gradient does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from agx.compat import shard_map
from agx.parallel.padding import axis_names, pad_to, round_up, without_unit_axes


def lookup(table_VxD, ids_BxT, mesh: Mesh, table_spec: PartitionSpec, ids_spec: PartitionSpec,
           rows_spec: PartitionSpec):
    """The rows of `ids` [B, T] in `table` [V, D]: [B, T, D] laid out by `rows_spec`, whose
    sequence axis may be split over `tensor` (sequence parallelism)."""
    table_spec, ids_spec, rows_spec = (without_unit_axes(s, mesh.shape) for s in (table_spec, ids_spec, rows_spec))
    vocab_axes, column_axes = axis_names(table_spec[0]), axis_names(table_spec[1])
    scatter = bool(vocab_axes) and set(vocab_axes) <= set(axis_names(rows_spec[1]))  # sequence parallel
    V, D = table_VxD.shape
    columns = math.prod(mesh.shape[a] for a in column_axes)
    table_VxD = pad_to(table_VxD, (V, round_up(D, columns)))

    def local(table_vxd, ids_bxt):
        table_vxD = table_vxd
        if column_axes:  # gathered whole, its padding cut
            gathered_vxD = jax.lax.all_gather(table_vxd, column_axes, axis=1, tiled=True)
            table_vxD = jax.lax.slice_in_dim(gathered_vxD, 0, D, axis=1)
        v = table_vxD.shape[0]
        first = jax.lax.axis_index(vocab_axes) * v if vocab_axes else 0
        local_ids_bxt = ids_bxt - first
        mine_bxt = (local_ids_bxt >= 0) & (local_ids_bxt < v)
        rows_bxtxD = jnp.take(table_vxD, jnp.where(mine_bxt, local_ids_bxt, 0), axis=0) * mine_bxt[..., None]
        if scatter:
            return jax.lax.psum_scatter(rows_bxtxD, vocab_axes, scatter_dimension=1, tiled=True)
        return rows_bxtxD[None]

    if scatter:  # unchecked: JAX's check refused it under two vmaps with spmd_axis_name (data replicas
        # around pipeline stages); its one collective, a reduce-scatter, transposes to the same
        # all-gather either way (the layouts' gradients match one device's: tests/test_pipeline.py)
        return shard_map(local, mesh, in_specs=(table_spec, ids_spec), out_specs=rows_spec, checked=False)(
            table_VxD, ids_BxT)
    # Else each vocabulary shard's rows, stacked on its axes and summed by XLA: an all-reduce, whose
    # gradient is each shard's copy, with nothing to reduce (a shard_map's psum would reduce it on
    # jax 0.5.0, which transposes psum to psum).
    stacked_spec = PartitionSpec(vocab_axes or None, *rows_spec)
    return shard_map(local, mesh, in_specs=(table_spec, ids_spec), out_specs=stacked_spec)(table_VxD, ids_BxT).sum(0)
