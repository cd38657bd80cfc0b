"""ZeRO stages as sharding choices over the `data` axis.

Stage 0 replicates weights, gradients and optimizer state over `data`; stage 1 shards the optimizer
state; 2 also the gradients; 3 also the weights. (`fsdp` always shards all three.) XLA then inserts
the collectives that DeepSpeed hand-codes: all-reduce or reduce-scatter of gradients, all-gather of
updated weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.config import Config
from agx.errors import UserError
from agx.parallel.mesh import Layout, kv_heads_split, logical_rules


@dataclass(frozen=True)
class ZeroLayouts:
    params: Layout
    grads: Layout
    opt_state: Layout


def zero_layouts(mesh: Mesh, cfg: Config) -> ZeroLayouts:
    split_kv = kv_heads_split(cfg.model.kv_heads, mesh.shape["tensor"])

    def layout(min_stage: int) -> Layout:
        return Layout(mesh, logical_rules(cfg.mesh.zero_stage >= min_stage, cfg.mesh.sequence_parallel, split_kv))

    return ZeroLayouts(params=layout(3), grads=layout(2), opt_state=layout(1))


def check_divisible(shapes, shardings, what: str) -> None:
    """Raises a one-line UserError for the first array whose dimensions the mesh does not divide."""
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, shape), sharding in zip(flat_shapes, flat_shardings):
        for dim, axes in zip(shape.shape, sharding.spec):
            size = _mesh_size(sharding.mesh, axes)
            if dim % size:
                name = jax.tree_util.keystr(path)
                raise UserError(f"mesh axes {axes} of size {size} do not divide dimension {dim} of {what} {name} "
                                f"{tuple(shape.shape)}: choose mesh sizes that divide the model's dimensions")


def _mesh_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[name] for name in names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
