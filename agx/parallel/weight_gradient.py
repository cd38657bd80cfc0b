"""A matmul, and a bias added, whose weight gradient is reduced by the collective meant: a reduce-scatter onto the
weight's shards where data-parallel axes shard it (FSDP, ZeRO-3: Rajbhandari et al. 2020, sec. 5),
an all-reduce only over the axes that split the batch or the sequence but keep the weight whole.

A weight's gradient, x^T·dy summed over the batch and the sequence, is a partial sum on each device
wherever those are split. Left to XLA's partitioner, its reduction onto the weight's shards is an
all-reduce and a slice, twice the bytes, on a backend without the pass that fuses them (the CPU's
has none). So the backward here computes each device's partial gradient in a shard_map and reduces
it there, by name. The forward and the input's gradient stay XLA's: their collectives (the weight's
all-gather, tensor parallelism's) already are the ones meant.

The weight comes in its stored dtype and is cast to the activation's for the product, on its
shards, so a bf16 model gathers bf16 weights. Its gradient is summed in float32 and stays float32,
as Megatron reduces a bf16 model's gradients (`accumulate_allreduce_grads_in_fp32`): a sum of bf16
partials over 64 devices would round at every step of the ring.

A weight dimension that its data-parallel axes do not divide (padded sharding, agx.parallel.padding)
is padded at the shard_map's edge, as XLA pads an uneven shard (each of n rows over k devices holds
ceil(n/k)): the partial gradient is padded with zeros to that multiple before its reduce-scatter and
cut back after it, and a weight gathered here is padded before its gather and cut after it. Padding
and cutting only the last shard's padding, XLA moves nothing for them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from agx.compat import shard_map
from agx.parallel.padding import axis_names, pad_to, round_up, unpad_to, without_unit_axes


def matmul(equation: str, x, w, x_spec: PartitionSpec, w_spec: PartitionSpec, y_spec: PartitionSpec, mesh: Mesh):
    """jnp.einsum(equation, x, w) ("X,W->Y", one letter per axis) in x's dtype, each operand laid
    out by its mesh spec; the weight gradient reduced as this file says."""
    x_spec, w_spec, y_spec = (without_unit_axes(s, mesh.shape) for s in (x_spec, w_spec, y_spec))
    reduction = _reduction(equation, w, x_spec, w_spec, y_spec, mesh)
    einsum = lambda x, w: jnp.einsum(equation, x, w.astype(x.dtype))
    if reduction is None:
        return einsum(x, w)
    ins, out = equation.split("->")
    x_letters, w_letters = ins.split(",")
    gradient_equation = f"{x_letters},{out}->{w_letters}"
    scatters = reduction[0]

    def local_gradient(x_local, dy_local):
        return _reduce(jnp.einsum(gradient_equation, x_local, dy_local, preferred_element_type=jnp.float32), reduction)

    @jax.custom_vjp
    def product(x, w):
        return einsum(x, w)

    # The weight's gathered dimensions first, as collectives gather along the outermost (a weight
    # gathered along its last dimension had its whole layer stack relaid out for it).
    scattered = [d for d, *_ in scatters]
    order = scattered + [d for d in range(len(w_letters)) if d not in scattered]
    gathered_first = f"{x_letters},{''.join(w_letters[d] for d in order)}->{out}"
    product_of_gathered = lambda x, w_first: jnp.einsum(gathered_first, x, w_first)

    def forward(x, w):  # the cast weight kept for the backward: one gather serves it and a recompute
        cast = jnp.transpose(w.astype(x.dtype), order)
        return product_of_gathered(x, cast), (x, cast)

    def backward(saved, dy):
        x, cast = saved
        dx = jax.vjp(lambda x_: product_of_gathered(x_, cast), x)[1](dy)[0]
        dw = shard_map(local_gradient, mesh, in_specs=(x_spec, y_spec), out_specs=w_spec)(x, dy)
        return dx, unpad_to(dw, w.shape).astype(w.dtype)

    product.defvjp(forward, backward)
    return product(x, w)


def add(x, b, x_spec: PartitionSpec, b_spec: PartitionSpec, mesh: Mesh):
    """x + b in x's dtype, b broadcast over x's leading dimensions, each laid out by its mesh spec;
    b's gradient (the sum of x's over those dimensions and wherever they are split) reduced as this
    file says: biases, and the learned positions, under FSDP and ZeRO-3."""
    x_spec, b_spec = (without_unit_axes(s, mesh.shape) for s in (x_spec, b_spec))
    letters, lead = "abcdefgh"[:x.ndim], x.ndim - b.ndim
    reduction = _reduction(f"{letters},{letters[lead:]}->{letters}", b, x_spec, b_spec, x_spec, mesh)
    if reduction is None:
        return x + b.astype(x.dtype)

    def local_gradient(dy_local):
        return _reduce(jnp.sum(dy_local, axis=tuple(range(lead)), dtype=jnp.float32), reduction)

    @jax.custom_vjp
    def plus(x, b):
        return x + b.astype(x.dtype)

    def backward(_, dy):
        db = shard_map(local_gradient, mesh, in_specs=(x_spec,), out_specs=b_spec)(dy)
        return dy, unpad_to(db, b.shape).astype(b.dtype)

    plus.defvjp(lambda x, b: (plus(x, b), None), backward)
    return plus(x, b)


def gathered_copies(w, w_spec: PartitionSpec, dw_spec: PartitionSpec, axes: tuple, dtype, mesh: Mesh):
    """w, laid out by w_spec, gathered whole over the data-parallel `axes` in `dtype`: one copy a
    device, [n, ...] with n on `axes`. For the weights that run beside the layers on the same rows (a
    tied embedding's lookup and head, the positions, the final norm): each use adds its gradient
    into the device's copy, where nothing is reduced, and the copies' gradient is reduced once, in
    float32, onto the gradient's shards (dw_spec: w_spec, or under ZeRO-2 also split over `data`) by
    one reduce-scatter, summed over any of `axes` that split no dimension of it. Each of w's
    dimensions is split over `axes` alone or not at all (copies_divide); one they do not divide is
    padded as this file says."""
    w_spec, dw_spec = (without_unit_axes(s, mesh.shape) for s in (w_spec, dw_spec))
    split = lambda spec: [(d, axis_names(spec[d] if d < len(spec) else None)) for d in range(w.ndim)]
    on_axes = lambda spec: [(d, over) for d, over in split(spec) if set(over) & set(axes)]
    gathered, scattered = on_axes(w_spec), on_axes(dw_spec)
    summed = tuple(a for a in axes if all(a not in over for _, over in scattered))
    copy_spec = PartitionSpec(axes, *(None if set(over) & set(axes) else over or None for _, over in split(w_spec)))
    padded = lambda spec: tuple(round_up(n, math.prod(mesh.shape[a] for a in over)) for n, (_, over) in
                                zip(w.shape, split(spec)))

    def gather(w_local):
        w_local = w_local.astype(dtype)
        for d, over in gathered:
            w_local = jax.lax.slice_in_dim(jax.lax.all_gather(w_local, over, axis=d, tiled=True), 0, w.shape[d], axis=d)
        return w_local[None]

    def scatter(d_copy):
        d_local = d_copy[0].astype(jnp.float32)
        for d, over in scattered:
            d_local = pad_to(d_local, (*d_local.shape[:d], padded(dw_spec)[d], *d_local.shape[d + 1:]))
            d_local = jax.lax.psum_scatter(d_local, over, scatter_dimension=d, tiled=True)
        return jax.lax.psum(d_local, summed) if summed else d_local

    # Both ways written out, and unchecked (nothing transposes them): JAX's transpose of the gather
    # would reduce in the copies' dtype.
    on_devices = lambda f, in_spec, out_spec: shard_map(f, mesh, (in_spec,), out_spec, checked=False)

    @jax.custom_vjp
    def copies(w):
        return on_devices(gather, w_spec, copy_spec)(pad_to(w, padded(w_spec)))

    def backward(_, d_copies):
        return (unpad_to(on_devices(scatter, copy_spec, dw_spec)(d_copies), w.shape).astype(w.dtype),)

    copies.defvjp(lambda w: (copies(w), None), backward)
    return copies(w)


def copies_divide(w_shape: tuple, specs: tuple, axes: tuple, mesh: Mesh) -> bool:
    """Whether gathered_copies can hold a weight laid out by specs (the weight's and its gradient's):
    each dimension split over `axes` alone (padded where they do not divide it), or not by them and
    divided by its axes, in each."""
    for spec in specs:
        spec = without_unit_axes(spec, mesh.shape)
        for d, n in enumerate(w_shape):
            over = axis_names(spec[d] if d < len(spec) else None)
            if set(over) & set(axes):
                if not set(over) <= set(axes):
                    return False
            elif n % math.prod(mesh.shape[a] for a in over):
                return False
    return True


def _reduce(dw, reduction: tuple):
    """A device's partial weight gradient, reduce-scattered onto its shards (padded first where its
    axes do not divide it) and all-reduced (_reduction)."""
    scatters, sums = reduction
    for dim, axes, padded in scatters:
        dw = pad_to(dw, (*dw.shape[:dim], padded, *dw.shape[dim + 1:]))
        dw = jax.lax.psum_scatter(dw, axes, scatter_dimension=dim, tiled=True)
    return jax.lax.psum(dw, sums) if sums else dw


def _reduction(equation, w, x_spec, w_spec, y_spec, mesh):
    """The weight gradient's collectives: ([(weight dimension, axes reduce-scattered onto it, its size
    padded to their multiple)], axes all-reduced), or None where the shard_map cannot hold them (a
    dimension split alike in x and the weight that its axes do not divide; an index split one way in
    x and another in the weight)."""
    ins, out = equation.split("->")
    x_letters, w_letters = ins.split(",")
    axes_of = lambda spec, i: axis_names(spec[i] if i < len(spec) else None)
    split_by = {}  # each index of x and y: the mesh axes that split it
    for letters, spec in ((x_letters, x_spec), (out, y_spec)):
        for i, letter in enumerate(letters):
            axes = axes_of(spec, i)
            if split_by.setdefault(letter, axes) != axes:
                return None
    summed = {a for letter, axes in split_by.items() if letter not in w_letters for a in axes}
    scatters = []
    for i, letter in enumerate(w_letters):
        target = axes_of(w_spec, i)
        k = math.prod(mesh.shape[a] for a in target)
        if target == split_by[letter]:
            if w.shape[i] % k:
                return None
            continue
        if split_by[letter] or not set(target) <= summed:
            return None
        scatters.append((i, target, round_up(w.shape[i], k)))
        summed -= set(target)
    if not scatters and not summed:
        return None
    return scatters, tuple(a for a in mesh.axis_names if a in summed)
