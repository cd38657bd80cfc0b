"""Data-parallel gradients, reduced once a step, by a collective that says what it means.

Where the gradients are replicated over `data` (ZeRO 0 and 1), summing them over the replicas after
every micro-batch is an all-reduce per micro-batch where one per step is the minimum. So each data
replica computes the gradient of its own rows, unreduced: the loss is vmapped over a leading replica
axis that lives on `data` (inside it the batch is split over `fsdp` alone), and the gradient comes
out [R, ...] with R on `data`. Accumulation adds these on each device without a collective. The one
reduction then happens once, in a shard_map: a reduce-scatter (`psum_scatter`) onto the optimizer
state's shards under ZeRO-1, an all-reduce (`psum`) under ZeRO-0, where every replica needs the
whole sum. Written out, they are reduce-scatters and all-reduces in the HLO on every backend, with
no reliance on a compiler pass that turns an all-reduce and a slice into a reduce-scatter.

Under ZeRO 2 and 3 the gradients are sharded over `data` as well, so they are reduced within the
backward pass of every micro-batch (as DeepSpeed does), and none of this applies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.compat import shard_map
from agx.parallel.mesh import Layout
from agx.parallel.padding import axis_names

REPLICA_AXIS = "data"


def replicas(zero_stage: int, mesh: Mesh) -> int:
    """How many data replicas hold unreduced gradients until the step's one reduction; 1: none do."""
    return mesh.shape[REPLICA_AXIS] if zero_stage <= 1 else 1


def replica_layout(layout: Layout) -> Layout:
    """The rules inside one replica: the batch split over the data-parallel axes but `data`. The
    embedding's looked-up rows are first left as the table splits d_model, then moved to the batch's
    split: in one step XLA gathered the whole activation under the vmap ("involuntary full
    rematerialization") where data and fsdp both exceed 1."""
    rules = dict(layout.rules)
    drop = lambda axes: tuple(a for a in axis_names(axes) if a != REPLICA_AXIS) or None
    changed = {"batch": drop(rules["batch"]), "lookup_batch": None,
               "lookup_embed": rules["embed"]}
    return dataclasses.replace(layout, rules=tuple((name, changed.get(name, axes)) for name, axes in layout.rules))


def per_replica(grad_fn, R: int, mesh: Mesh):
    """grad_fn: (params, tokens_bxT1, rng, step, *per_replica_args) -> (loss, grads). Returns the same
    function of the whole batch that gives each replica's loss [R] and gradients [R, ...], unreduced;
    its per_replica_args are [R, ...] too (the replicas' gradient sums, agx.training.accumulation)."""
    rows = NamedSharding(mesh, PartitionSpec(REPLICA_AXIS, "fsdp", None))

    def replica_grads(params, tokens_bxT1, rng, step, *per_replica_args):
        tokens_Rxb_xT1 = jax.lax.with_sharding_constraint(tokens_bxT1.reshape(R, -1, tokens_bxT1.shape[-1]), rows)
        rngs_R = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(R))
        vmapped = jax.vmap(grad_fn, in_axes=(None, 0, 0, None) + (0,) * len(per_replica_args),
                           spmd_axis_name=REPLICA_AXIS)
        return vmapped(params, tokens_Rxb_xT1, rngs_R, step, *per_replica_args)

    return replica_grads


def replica_shardings(grad_shardings):
    """Where a tree of per-replica gradients [R, ...] lives: R on `data`, the rest as the gradient."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, PartitionSpec(REPLICA_AXIS, *s.spec)),
                                  grad_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def reduce_replicas(grads_RxW, grad_shardings, target_shardings, R: int):
    """The mean over the replicas, in `target_shardings`: each leaf reduce-scattered over `data` onto
    the dimension the target splits over `data`, or all-reduced where the target keeps it whole."""
    flat, tree = jax.tree_util.tree_flatten(grads_RxW)
    leaves = lambda shardings: jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    sources = [s.spec for s in leaves(replica_shardings(grad_shardings))]
    targets = [s.spec for s in leaves(target_shardings)]
    mesh = leaves(target_shardings)[0].mesh

    def reduce_one(target: PartitionSpec):
        split = [i for i, axes in enumerate(target) if REPLICA_AXIS in axis_names(axes)]

        def local(g_1xW):
            g_W = g_1xW[0] / R
            if split:
                return jax.lax.psum_scatter(g_W, REPLICA_AXIS, scatter_dimension=split[0], tiled=True)
            return jax.lax.psum(g_W, REPLICA_AXIS)

        return local

    reduced = [shard_map(reduce_one(t), mesh, in_specs=(s,), out_specs=t)(g)
               for g, s, t in zip(flat, sources, targets)]
    return jax.tree_util.tree_unflatten(tree, reduced)
