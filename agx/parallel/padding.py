"""Padded sharding: any mesh shards any model.

JAX shards an array only evenly, in every release. DeepSpeed's ZeRO does not ask that: it pads each
partition. agx does the same where the data-parallel axes are concerned: a weight dimension that its
`fsdp` (and, under ZeRO, `data`) axes do not divide is *stored* rounded up to the next multiple,
zeros at the end. The model never sees the padding: the step slices each weight back to its logical
shape inside the jitted function, where uneven intermediates are allowed (each layer's weights where
the layer runs, when the backward adds into the gradient sum: agx.training.accumulation). agx's own
collectives pad at their edges as XLA pads an uneven shard (agx.parallel.weight_gradient), so a
padded weight is gathered and its gradient reduce-scattered as an unpadded one's. The padding's
gradient is then zero, and AdamW (with weight decay) keeps a zero at zero, so it stays zero for ever and adds
nothing to the gradient norm.

Parameters, gradients and optimizer state are stored at one padded shape, the multiple of every
layout that shards them, so that the optimizer adds arrays of one shape. `tensor` and `pipeline`
still divide evenly: a padded attention head or layer would be computed, not just stored.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from agx.errors import UserError

MUST_DIVIDE = ("tensor", "pipeline")


def axis_names(axes) -> tuple[str, ...]:
    """The mesh axes of one entry of a PartitionSpec."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def without_unit_axes(spec: PartitionSpec, mesh_shape) -> PartitionSpec:
    """`spec` without the mesh axes of size 1, which split nothing: a shard_map then runs no
    collective over them, nor needs one to agree with its specs."""
    kept = [tuple(a for a in axis_names(axes) if mesh_shape[a] > 1) for axes in spec]
    return PartitionSpec(*(names[0] if len(names) == 1 else names or None for names in kept))


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple: the stored size of n rows over `multiple` shards, as XLA pads an
    uneven shard (ceil(n / multiple) rows each)."""
    return -(-n // multiple) * multiple


def stored_shape(shape: tuple, specs: list[PartitionSpec], mesh_shape: dict, what) -> tuple[int, ...]:
    """`shape` with each dimension rounded up to a multiple of the mesh axes that shard it in any of
    `specs`; a UserError in one line where `tensor` or `pipeline` does not divide it. `what()` names
    the array in that line (a search sizes thousands of layouts, and naming costs more than sizing)."""
    stored = []
    for i, n in enumerate(shape):
        multiple = 1
        for spec in specs:
            names = axis_names(spec[i] if i < len(spec) else None)
            strict = math.prod(mesh_shape[a] for a in names if a in MUST_DIVIDE)
            if n % strict:
                raise UserError(f"mesh axes {spec[i]} of size {strict} do not divide dimension {n} of {what()} "
                                f"{tuple(shape)}: tensor and pipeline sizes must divide the model's dimensions")
            multiple = math.lcm(multiple, math.prod(mesh_shape[a] for a in names))
        stored.append(round_up(n, multiple))
    return tuple(stored)


def stored_shapes(abstract, spec_trees: list, mesh_shape: dict, what: str):
    """ShapeDtypeStructs at the stored shapes of a tree of `abstract` arrays, each padded for its
    specs in every tree of `spec_trees` (trees of mesh PartitionSpecs like `abstract`)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    leaves_with_path, tree = jax.tree_util.tree_flatten_with_path(abstract)
    flat_specs = [jax.tree_util.tree_leaves(specs, is_leaf=is_spec) for specs in spec_trees]
    stored = [jax.ShapeDtypeStruct(stored_shape(leaf.shape, [specs[i] for specs in flat_specs], mesh_shape,
                                                lambda path=path: f"{what} {jax.tree_util.keystr(path)}"), leaf.dtype)
              for i, (path, leaf) in enumerate(leaves_with_path)]
    return jax.tree_util.tree_unflatten(tree, stored)


def pad_to(x, shape: tuple):
    """Zeros appended up to `shape` (nothing at all where the shape is already `shape`)."""
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, stored - n) for n, stored in zip(x.shape, shape)])


def unpad_to(x, shape: tuple):
    """The logical `shape` cut from a stored array (nothing at all where they are the same)."""
    if x.shape == tuple(shape):
        return x
    return jax.lax.slice(x, (0,) * x.ndim, tuple(shape))
