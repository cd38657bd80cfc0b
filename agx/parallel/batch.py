"""Where a batch of sequences lives: split over the data-parallel axes, and cut into micro-batches
(for gradient accumulation and for the pipeline) without moving a row between devices."""

from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.parallel.mesh import BATCH_AXES


def data_parallel_size(mesh_shape: Mapping[str, int]) -> int:
    """How many ways the batch is split: data × fsdp."""
    return mesh_shape["data"] * mesh_shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """An array [B, ...] of `ndim` dimensions split over the data-parallel axes by its rows: token
    batches [B, T+1], and the sampler's per-sequence positions [B]."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (ndim - 1)))


def split_microbatches(x_BxX, M: int):
    """[B, ...] -> [M, B/M, ...]: micro-batch m takes rows m, m+M, ..., so that each data-parallel
    shard of the rows splits evenly on its own device."""
    return x_BxX.reshape(x_BxX.shape[0] // M, M, *x_BxX.shape[1:]).swapaxes(0, 1)


def row_groups(x_BxZ, groups: int, batch_split: int):
    """The batch [B, ...] as `groups` groups of rows [G, B/G, ...], for a vmap over an axis that
    splits the batch last (the pipeline's stages; the copies of agx.parallel.weight_gradient's
    gathered_copies): the rows in S·G blocks, S = batch_split the splits before, block (s, g) in
    group g at place s. No row moves between devices."""
    S, G = batch_split, groups
    x_SxGxZ = x_BxZ.reshape(S, G, x_BxZ.shape[0] // (S * G), *x_BxZ.shape[1:])
    return x_SxGxZ.swapaxes(0, 1).reshape(G, -1, *x_BxZ.shape[1:])


def rows_of_groups(x_GxnxZ, batch_split: int):
    """row_groups' inverse: the groups' rows [G, n, ...] back in the batch's order [G·n, ...]."""
    G, n, *rest = x_GxnxZ.shape
    S = batch_split
    return x_GxnxZ.reshape(G, S, n // S, *rest).swapaxes(0, 1).reshape(G * n, *rest)
