"""ZeRO stages as sharding choices over the `data` axis.

Stage 0 replicates weights, gradients and optimizer state over `data`; stage 1 shards the optimizer
state; 2 also the gradients; 3 also the weights. (`fsdp` always shards all three.) The collectives
that DeepSpeed hand-codes are agx's where a gradient is reduced (agx.parallel.weight_gradient and
.data_parallel: under ZeRO-2 the backward reduce-scatters onto the gradient's shards, which the
parameters' layout carries as its gradient rules) and XLA's where the layouts alone say what moves
(the updated weights' all-gather).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.config import MeshConfig
from agx.parallel.context import with_split_attention
from agx.parallel.mesh import Layout, kv_heads_split, logical_rules
from agx.parallel.padding import axis_names


@dataclass(frozen=True)
class ZeroLayouts:
    params: Layout
    grads: Layout
    opt_state: Layout

    @property
    def all(self) -> tuple[Layout, Layout, Layout]:
        return self.params, self.grads, self.opt_state


def zero_layouts(mesh: Mesh, mesh_cfg: MeshConfig, kv_heads: int) -> ZeroLayouts:
    """The layouts of the parameters, gradients and optimizer state under mesh_cfg's ZeRO stage."""
    split_kv = kv_heads_split(kv_heads, mesh.shape["tensor"])

    def layout(min_stage: int) -> Layout:
        return with_split_attention(
            Layout(mesh, logical_rules(mesh_cfg.zero_stage >= min_stage, mesh_cfg.sequence_parallel, split_kv,
                                       batch_order=mesh_cfg.zero_stage == 3)))

    params, grads = layout(3), layout(2)
    # the model's backward reduces each weight's gradient straight onto the gradient's shards
    params = params if grads.rules == params.rules else dataclasses.replace(params, gradient_rules=grads.rules)
    return ZeroLayouts(params=params, grads=grads, opt_state=layout(1))


def bytes_per_device(arrays, specs, mesh_shape, what: str, itemsize: int | None = None) -> int:
    """The bytes of one device's shards of `arrays` (ShapeDtypeStructs, each in its own dtype or in
    `itemsize`-byte elements) laid out by `specs` (a tree of mesh PartitionSpecs) on a mesh of
    `mesh_shape`: the stored shapes (agx.parallel.padding), which the mesh divides."""
    total = 0
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, array), spec in zip(jax.tree_util.tree_leaves_with_path(arrays), flat_specs):
        shard = list(array.shape)
        for i, axes in enumerate(spec):
            size = math.prod(mesh_shape[name] for name in axis_names(axes))
            assert shard[i] % size == 0, (what, jax.tree_util.keystr(path), array.shape, spec)
            shard[i] //= size
        total += math.prod(shard) * (itemsize or array.dtype.itemsize)
    return total


def mesh_specs(shardings):
    """The mesh PartitionSpecs of a tree of NamedShardings."""
    return jax.tree_util.tree_map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
