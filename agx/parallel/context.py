"""Context parallelism: each sequence split over the `context` mesh axis, for sequences whose
activations do not fit one device (Megatron-LM's --context-parallel-size, MaxText's `context` axis).

Every activation's sequence axis is split over `context` (the rules in agx.parallel.mesh); weights
are not, so their gradients are summed over it like a data-parallel axis's (Megatron keeps them
whole over its CP ranks too: sharding them as well is what `fsdp` is for). Only attention needs
the other devices' positions. It all-gathers the keys and values, the KV heads only, and the
backward reduce-scatters their gradients back onto their devices (MaxText's default and Megatron's
`allgather` type): the simplest correct design, one [B, K, T, Q] gather per layer each for K and V.
Both are written out in a shard_map, so that the backward's is a reduce-scatter on every backend.

Load balance. Under a causal mask the last positions attend to the most keys, so contiguous chunks
would give the last device 2C-1 times the first's work. The sequence is therefore cut into 2C chunks
and device i holds chunks i and 2C-1-i (Megatron's and MaxText's load-balanced order): every
device attends 2C+1 chunk pairs of the (2C)·(2C+1)/2 under the mask. The caller puts the tokens and
the targets in this order (`load_balanced_order`; the loss is a mean over all of them, which the
order does not change) and gives the model each slot's position, for learned and rotary positions.

Inside the attention each device computes, with the same shapes on every device, its 2C-1 full
chunk pairs (a query chunk against an earlier key chunk, no mask) and its two diagonal pairs
(causal, in the model's query blocks), then merges them by their log-sum-exps.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from agx.compat import shard_map
from agx.errors import UserError
from agx.parallel.mesh import Layout
from agx.parallel.padding import without_unit_axes


def check_divides(seq_len: int, context: int) -> None:
    if context > 1 and seq_len % (2 * context):
        raise UserError(f"model.seq_len={seq_len} is not divisible by 2·mesh.context={2 * context} "
                        "(context parallelism cuts each sequence into 2·context equal chunks)")


def load_balanced_order(seq_len: int, context: int) -> np.ndarray:
    """The position held in each slot of the sequence as split over `context` devices: device i's
    slots hold chunks i and 2C-1-i of 2C."""
    chunks = np.arange(seq_len).reshape(2 * context, seq_len // (2 * context))
    return np.stack([chunks[:context], chunks[context:][::-1]], axis=1).reshape(seq_len)


def reorder(x_BxT, context: int):
    """Tokens (or targets) [B, T] in load-balanced order, for a `context` > 1."""
    return x_BxT[:, load_balanced_order(x_BxT.shape[1], context)]


def _full_pairs(context: int) -> tuple[np.ndarray, np.ndarray]:
    """Each device's 2C-1 full pairs below the diagonal: [C, 2C-1] whether pair p's query chunk is the
    device's first (chunk i, keys 0..i-1) or its second (chunk 2C-1-i, keys 0..2C-2-i), and the key
    chunk (in position order) that it attends."""
    i, p = np.arange(context)[:, None], np.arange(2 * context - 1)[None]
    first = p < i
    return first, np.where(first, p, p - i)


def with_split_attention(layout: Layout) -> Layout:
    """`layout` with this file's attention for the model to call, where its rules split sequences."""
    C = layout.sequence_split()
    if C == 1:
        return layout
    return dataclasses.replace(layout, split_attention=functools.partial(attention, context=C))


def attention(layout: Layout, q_BxHxTxQ, k_BxKxTxQ, v_BxKxTxQ, attend, causal, context: int):
    """Causal attention over a sequence in load-balanced order, split over `context` devices.

    q: each device's own positions (split over `context`); k, v: the whole sequence, gathered, of
    the K KV heads (each serving H/K consecutive query heads: repeated here, after the gather and
    the pairing, so that neither moves more than the KV heads, forward or backward).
    layout: the one the model runs in (a data replica's, agx.parallel.data_parallel, inside its vmap).
    attend(q, k, v) and causal(q, k, v): the model's unmasked and causal attention over any leading
    dimensions, each returning (context vectors [..., t, Q] float32, log-sum-exp [..., t])."""
    B, H, T, Q = q_BxHxTxQ.shape
    K, constrain = k_BxKxTxQ.shape[1], layout.constrain
    C, c, P = context, T // (2 * context), 2 * context - 1
    own = ("batch", "heads", "length", None, None, "kv")  # [B, H, C, ..., c, Q], C over `context`
    on_devices = lambda x, logical: constrain(x.reshape(x.shape[0], x.shape[1], C, 2, c, Q), logical)
    heads = lambda x: x if K == H else constrain(jnp.repeat(x, H // K, axis=1), own)  # K -> H, locally
    on_devices_table = lambda table: constrain(jnp.asarray(table), ("length", None))  # row i on device i
    q_BxHxCx2xcxQ = on_devices(q_BxHxTxQ, own)
    first_CxP, key_chunk_CxP = _full_pairs(C)
    # Each device's key chunks: its full pairs' and then its own two (for the diagonal), taken from the
    # gathered keys in one gather, so that their gradients meet in one sum before it is split back.
    own_chunks_Cx2 = np.stack([np.arange(C), 2 * C - 1 - np.arange(C)], axis=1)
    key_chunk_CxPp2 = np.concatenate([key_chunk_CxP, own_chunks_Cx2], axis=1)
    first_CxP = on_devices_table(first_CxP)

    kv_2xBxKxCxPp2xcxQ = _key_chunks(layout, key_chunk_CxPp2, c)(jnp.stack([k_BxKxTxQ, v_BxKxTxQ]))
    k_BxHxCxPp2xcxQ, v_BxHxCxPp2xcxQ = heads(kv_2xBxKxCxPp2xcxQ[0]), heads(kv_2xBxKxCxPp2xcxQ[1])
    diagonal_ctx, diagonal_lse = causal(q_BxHxCx2xcxQ, k_BxHxCxPp2xcxQ[:, :, :, P:], v_BxHxCxPp2xcxQ[:, :, :, P:])
    k_BxHxCxPxcxQ, v_BxHxCxPxcxQ = k_BxHxCxPp2xcxQ[:, :, :, :P], v_BxHxCxPp2xcxQ[:, :, :, :P]
    q_BxHxCxPxcxQ = jnp.where(first_CxP[:, :, None, None], q_BxHxCx2xcxQ[:, :, :, :1], q_BxHxCx2xcxQ[:, :, :, 1:])
    full_ctx, full_lse_BxHxCxPxc = attend(q_BxHxCxPxcxQ, k_BxHxCxPxcxQ, v_BxHxCxPxcxQ)

    # Merge: each query chunk's pairs and its diagonal, weighted by exp(lse_part - lse_all).
    member_Cx2xP = jnp.stack([first_CxP, ~first_CxP], axis=1)
    part_lse_BxHxCx2xPxc = jnp.where(member_Cx2xP[:, :, :, None], full_lse_BxHxCxPxc[:, :, :, None], -jnp.inf)
    part_lse_BxHxCx2xPp1xc = jnp.concatenate([part_lse_BxHxCx2xPxc, diagonal_lse[:, :, :, :, None]], axis=4)
    lse_BxHxCx2xc = jax.nn.logsumexp(part_lse_BxHxCx2xPp1xc, axis=4)
    weight_BxHxCx2xPp1xc = jnp.exp(part_lse_BxHxCx2xPp1xc - lse_BxHxCx2xc[:, :, :, :, None])
    ctx_BxHxCx2xcxQ = (jnp.einsum("bhcjpt,bhcptq->bhcjtq", weight_BxHxCx2xPp1xc[:, :, :, :, :-1], full_ctx)
                       + weight_BxHxCx2xPp1xc[:, :, :, :, -1, :, None] * diagonal_ctx)
    return constrain(ctx_BxHxCx2xcxQ, own).reshape(B, H, T, Q)


def _key_chunks(layout: Layout, key_chunk_CxN, c: int):
    """x [2, B, K, T, Q], keys and values (T split over `context` in load-balanced order) ->
    [2, B, K, C, N, c, Q]: on device i, the N chunks of c positions that row i of key_chunk_CxN
    names, in position order. Each device gathers the whole sequence and takes its chunks; the
    backward sums each chunk's gradient on its device, then reduce-scatters the sequence's back onto
    the devices. Keys and values go together: one collective each way, never two that devices could
    enter in different orders. Both ways written out, in a custom_vjp: JAX's transpose of the gather
    fails under 1F1B's vmaps, and so does its check of the shard_maps, which nothing transposes."""
    spec = lambda logical: without_unit_axes(layout.spec(logical), layout.mesh.shape)
    x_spec = spec((None, "batch", "kv_heads", "length", "kv"))
    out_spec = spec((None, "batch", "kv_heads", "length", None, None, "kv"))
    axes = x_spec[3]
    table_spec = PartitionSpec(axes, None)  # row i on device i
    on_devices = lambda f, in_spec, out_spec: shard_map(f, layout.mesh, (in_spec, table_spec), out_spec, checked=False)
    C = len(key_chunk_CxN)

    def in_position_order(x_2xbxkxTxQ):  # slot order (device j's chunks j and 2C-1-j) -> chunk order
        x_2xbxkxCx2xcxQ = x_2xbxkxTxQ.reshape(*x_2xbxkxTxQ.shape[:3], C, 2, c, x_2xbxkxTxQ.shape[-1])
        return jnp.concatenate([x_2xbxkxCx2xcxQ[:, :, :, :, 0], x_2xbxkxCx2xcxQ[:, :, :, ::-1, 1]], axis=3)

    def take_mine(x_2xbxkxtxQ, mine_1xN):
        x_2xbxkxTxQ = jax.lax.all_gather(x_2xbxkxtxQ, axes, axis=3, tiled=True)
        return jnp.take(in_position_order(x_2xbxkxTxQ), mine_1xN[0], axis=3)[:, :, :, None]

    def give_back(d_2xbxkx1xNxcxQ, mine_1xN):
        _, b, k, _, N, _, Q = d_2xbxkx1xNxcxQ.shape
        d_2xbxkx2CxcxQ = jnp.zeros((2, b, k, 2 * C, c, Q), d_2xbxkx1xNxcxQ.dtype).at[:, :, :, mine_1xN[0]].add(
            d_2xbxkx1xNxcxQ[:, :, :, 0])
        first, second = d_2xbxkx2CxcxQ[:, :, :, :C], d_2xbxkx2CxcxQ[:, :, :, C:][:, :, :, ::-1]  # slot order
        d_2xbxkxTxQ = jnp.stack([first, second], axis=4).reshape(2, b, k, 2 * C * c, Q)
        return jax.lax.psum_scatter(d_2xbxkxTxQ, axes, scatter_dimension=3, tiled=True)

    @jax.custom_vjp
    def chunks(x_2xBxKxTxQ):
        return on_devices(take_mine, x_spec, out_spec)(x_2xBxKxTxQ, jnp.asarray(key_chunk_CxN))

    def backward(_, d_2xBxKxCxNxcxQ):
        return (on_devices(give_back, out_spec, x_spec)(d_2xBxKxCxNxcxQ, jnp.asarray(key_chunk_CxN)),)

    chunks.defvjp(lambda x_2xBxKxTxQ: (chunks(x_2xBxKxTxQ), None), backward)
    return chunks
