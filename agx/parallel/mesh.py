"""The device mesh and the table that maps logical array axes onto it.

Model code names its axes ('embed', 'heads', 'batch', ...); this file alone decides where they live.
Pipeline stages are rules too: the stacked layers' leading axis ('layers') and the stage axis of the
pipeline's activations ('stage') live on `pipeline`. Megatron's tensor parallelism is just rules here: 'heads' and 'mlp' on `tensor` make QKV and fc
column-parallel and the attention output and second MLP matrix row-parallel; 'vocab' on `tensor`
makes the embedding and the tied LM head vocab-parallel. Context parallelism is rules too: the
sequence ('length', and 'act_length' with it) on `context`; keys and values ('kv_length') whole.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agx.config import MeshConfig
from agx.errors import UserError
from agx.parallel import sequence, vocab, weight_gradient
from agx.parallel.padding import axis_names

AXES = ("pipeline", "data", "fsdp", "context", "tensor")  # outermost first: `tensor` on neighbouring devices
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolves -1 (fill with the devices left) and checks that the mesh covers the devices exactly."""
    sizes = {axis: getattr(cfg, axis) for axis in AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"mesh {sizes}: sizes must be positive, and at most one may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
        raise UserError(f"mesh {_fmt(sizes)} does not divide the {num_devices} devices")
    if fill:
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(f"mesh {_fmt(sizes)} uses {fixed} devices but {num_devices} are present")
    return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in sizes.items())


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(mesh_utils.create_device_mesh(tuple(shape.values()), devices=np.asarray(devices).ravel()), AXES)


def kv_heads_split(kv_heads: int, tensor: int) -> bool:
    return kv_heads % tensor == 0


def process_hosts() -> list[str]:
    """Each process's host name, in process order: one all-gather, which every process must join."""
    if jax.process_count() == 1:
        return [socket.gethostname()]
    from jax.experimental import multihost_utils

    name = np.frombuffer(socket.gethostname().encode()[:255].ljust(256, b"\0"), np.uint8)
    names = np.asarray(multihost_utils.process_allgather(name)).reshape(jax.process_count(), -1)
    return [bytes(row).rstrip(b"\0").decode() for row in names]


def tensor_groups_across_hosts(mesh: Mesh, host_of_process) -> list[set[str]]:
    """The hosts of each `tensor` group that spans more than one: every layer's tensor-parallel
    all-reduces would cross the network there. `host_of_process[i]` names process i's host."""
    groups = np.moveaxis(mesh.devices, AXES.index("tensor"), -1).reshape(-1, mesh.shape["tensor"])
    hosts = [{host_of_process[device.process_index] for device in group} for group in groups]
    return [h for h in hosts if len(h) > 1]


def logical_rules(shard_over_data: bool, sequence_parallel: bool, split_kv_heads: bool,
                  batch_order: bool = False) -> tuple:
    """Logical axis -> mesh axes. Weights use 'embed'; activations use 'act_embed' and 'act_length'.

    shard_over_data: also shard weight-shaped arrays over `data` (ZeRO), besides `fsdp`.
    split_kv_heads: the KV heads of grouped-query attention divide by `tensor`; otherwise every
    tensor rank keeps them all, as Megatron does when tensor parallelism exceeds the KV heads.
    batch_order: split them over `data` and `fsdp` in the batch's order (ZeRO-3, whose weights are
    gathered over both: in the other order XLA reordered the gathered shards by collective-permutes).
    Otherwise `fsdp` comes first: ZeRO-1's one reduction scatters each replica's `fsdp` shard over
    `data` (agx.parallel.data_parallel).
    """
    return (
        ("batch", BATCH_AXES),
        ("lookup_batch", BATCH_AXES),  # the embedding's looked-up rows: where the batch is, unless
        ("lookup_embed", None),        # agx.parallel.data_parallel moves them in two steps
        ("layers", "pipeline"),
        ("stage", "pipeline"),
        ("length", "context"),  # a sequence's positions (agx.parallel.context's order where context > 1)
        ("act_length", ("context", "tensor") if sequence_parallel else "context"),  # residual stream between blocks
        ("vocab", "tensor"),
        ("tensor_stack", "tensor"),  # one slice per tensor rank (agx.parallel.sequence)
        ("heads", "tensor"),
        ("kv_heads", "tensor" if split_kv_heads else None),
        ("mlp", "tensor"),
        ("embed", (BATCH_AXES if batch_order else ("fsdp", "data")) if shard_over_data else "fsdp"),
    )


@dataclass(frozen=True)
class Layout:
    """A mesh with one rules table: turns logical axis names into concrete NamedShardings.

    split_attention: where the rules split a sequence ('length') over devices, the causal attention
    that works across the split (agx.parallel.context), called by the model with its own attention
    functions; None where each device holds whole sequences.
    gradient_rules: where the weights' gradients are reduced to, where that differs from the weights'
    own rules (ZeRO-2: the gradients sharded over `data`, the weights whole); None: the same."""

    mesh: Mesh
    rules: tuple
    split_attention: Callable | None = field(default=None, compare=False)
    gradient_rules: tuple | None = None

    def sequence_split(self) -> int:
        """How many ways a sequence's positions ('length') are split over devices."""
        return math.prod(self.mesh.shape[a] for a in axis_names(dict(self.rules).get("length")))

    def batch_split(self) -> int:
        """How many ways the batch's rows ('batch') are split over devices."""
        return math.prod(self.mesh.shape[a] for a in axis_names(dict(self.rules).get("batch")))

    def whole_sequences(self) -> Layout:
        """This layout with each sequence whole on every device, split over neither `context` nor
        (sequence parallelism) `tensor`: the sampler's, whose cache grows one position at a time."""
        keep = lambda axes: tuple(a for a in axis_names(axes) if a not in ("context", "tensor")) or None
        return dataclasses.replace(self, split_attention=None, rules=tuple(
            (name, keep(axes) if name in ("length", "act_length") else axes) for name, axes in self.rules))

    def without(self, axes: tuple) -> Layout:
        """This layout with `axes` taken out of every rule: the layout inside a vmap over them
        (spmd_axis_name), which splits the vmapped dimension over them instead."""
        drop = lambda names: tuple(a for a in axis_names(names) if a not in axes) or None
        dropped = lambda rules: rules and tuple((name, drop(names)) for name, names in rules)
        return dataclasses.replace(self, rules=dropped(self.rules), gradient_rules=dropped(self.gradient_rules))

    def tensor_stack(self) -> int:
        """J: the stacked slices in which the model's tensor-parallel matmuls meet the residual
        stream. `tensor` where sequence parallelism splits the stream over it (agx.parallel.sequence),
        else 1: the matmuls then meet the stream whole, and XLA places their all-reduces."""
        return self.mesh.shape["tensor"] if "tensor" in axis_names(dict(self.rules)["act_length"]) else 1

    def gather_sequence(self, x_BxTxD):
        """The residual stream [B, T, D] -> [J, B, T, D], the whole sequence in each of J slices."""
        if self.tensor_stack() == 1:
            return self.constrain(x_BxTxD, ("batch", "length", "act_embed"))[None]
        return sequence.gather(x_BxTxD, self.mesh, *self._stream_specs())

    def scatter_sequence(self, y_JxBxTxD):
        """J stacked partial sums [J, B, T, D] -> their sum [B, T, D], laid out as the residual stream."""
        if self.tensor_stack() == 1:
            return self.constrain(y_JxBxTxD[0], ("batch", "act_length", "act_embed"))
        split, whole = self._stream_specs()
        return sequence.scatter(y_JxBxTxD, self.mesh, whole, split)

    def _stream_specs(self) -> tuple[PartitionSpec, PartitionSpec]:
        """The residual stream's spec, split along the sequence, and whole."""
        return self.spec(("batch", "act_length", "act_embed")), self.spec(("batch", "length", "act_embed"))

    def matmul(self, equation: str, x, w, x_logical: tuple, w_logical: tuple, y_logical: tuple):
        """einsum(equation, x, w) of an activation and a weight, the weight's gradient reduced onto
        the gradient's shards by the collectives meant (agx.parallel.weight_gradient)."""
        specs = (self.spec(x_logical), self.gradient_spec(w_logical), self.spec(y_logical))
        return weight_gradient.matmul(equation, x, w, *specs, self.mesh)

    def add(self, x, b, x_logical: tuple, b_logical: tuple):
        """x + b of an activation and a bias (or the positions), b's gradient reduced onto the
        gradient's shards by the collectives meant (agx.parallel.weight_gradient)."""
        return weight_gradient.add(x, b, self.spec(x_logical), self.gradient_spec(b_logical), self.mesh)

    def lookup(self, table_VxD, ids_BxT):
        """The embedding rows of `ids` [B, T]: [B, T, D]. By agx.parallel.vocab's lookup where the
        table's columns are split (FSDP, ZeRO-3) or the sequence is (sequence parallelism), and the
        mesh divides the vocabulary and the rows (columns it does not divide are padded there); else
        by XLA, whose lookup is then the one meant (the rules may place the rows apart first:
        'lookup_batch', 'lookup_embed')."""
        specs = (self.spec(("vocab", "embed")), self.spec(("batch", "length")), self._stream_specs()[0])
        split = self.tensor_stack() > 1 or math.prod(self.mesh.shape[a] for a in axis_names(specs[0][1])) > 1
        rows_shape = (*ids_BxT.shape, table_VxD.shape[1])
        if split and self._divides(table_VxD.shape[:1], specs[0]) and self._divides(rows_shape, specs[2]):
            return vocab.lookup(table_VxD, ids_BxT, self.mesh, *specs)
        rows_BxTxD = self.constrain(jnp.take(table_VxD, ids_BxT, axis=0), ("lookup_batch", "length", "lookup_embed"))
        return self.constrain(rows_BxTxD, ("batch", "length", "act_embed"))

    def _divides(self, shape: tuple, spec: PartitionSpec) -> bool:
        return all(n % math.prod(self.mesh.shape[a] for a in axis_names(axes)) == 0 for n, axes in zip(shape, spec))

    def spec(self, logical: tuple) -> PartitionSpec:
        return nn.logical_to_mesh_axes(logical, self.rules)

    def gradient_spec(self, logical: tuple) -> PartitionSpec:
        """Where the gradient of a weight of these logical axes is reduced to."""
        return nn.logical_to_mesh_axes(logical, self.gradient_rules or self.rules)

    def sharding(self, logical: tuple) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical))

    def constrain(self, x, logical: tuple):
        return jax.lax.with_sharding_constraint(x, self.sharding(logical))

    def tree_shardings(self, logical_tree):
        """Maps a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
        return nn.logical_to_mesh_sharding(logical_tree, self.mesh, self.rules)

