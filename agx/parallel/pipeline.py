"""Pipeline parallelism over the `pipeline` mesh axis, in one SPMD program.

The layer stack [L, ...] is viewed as [R, P, L/(R·P), ...], its stage axis on `pipeline`: stage s
runs layers (r·P + s)·L/(R·P) onward in repeat r. Each iteration of one loop runs every stage at
once on its current micro-batch (vmap over stages, spmd_axis_name='pipeline'), then rotates the
stage outputs one stage onward, which XLA turns into collective-permutes. R = 1 is GPipe; with
R > 1 (circular, Megatron's interleaved stages) a micro-batch leaving the last stage goes round to
the first again, for its next repeat. The backward pass is autodiff through the loop.

Micro-batches wait in an in/out buffer [P, M/P, ...] that rotates with the stages, so stage 0
always reads and stage P-1 always writes its own shard: slot (p, k) holds micro-batch k·P + q with
p = -q mod P, which is where stage 0 is when that micro-batch's turn comes, and where stage P-1 is
when it comes out. Bubble iterations run on zeros and pass no gradient back.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from agx.config import PipelineConfig
from agx.errors import UserError
from agx.parallel.batch import data_parallel_size

STAGE_INPUT = "pipeline_stage_input"
# The backward pass keeps only each iteration's stage input and recomputes the stage from it.
# (Plain jax.checkpoint of the iteration would keep its whole carry, the in/out buffer included.)
SAVE_STAGE_INPUTS = jax.checkpoint_policies.save_only_these_names(STAGE_INPUT)


@dataclass(frozen=True)
class Schedule:
    stages: int  # P
    microbatches: int  # M
    repeats: int  # R
    one_f_one_b: bool = False  # agx.parallel.one_f_one_b instead of autodiff through this loop

    @property
    def name(self) -> str:
        return "1f1b" if self.one_f_one_b else "gpipe" if self.repeats == 1 else "circular"

    @property
    def iterations(self) -> int:
        """Loop iterations per accumulation step; each runs every stage once (1F1B: forward and backward)."""
        if self.one_f_one_b:
            return self.microbatches + 2 * self.stages - 2
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        idle = 2 * self.stages - 2 if self.one_f_one_b else self.stages - 1
        return idle / self.iterations

    def describe(self) -> dict:
        return {"schedule": self.name, "stages": self.stages, "microbatches": self.microbatches,
                "repeats": self.repeats, "bubble_fraction": round(self.bubble_fraction, 4)}


def plan_schedule(pipe: PipelineConfig, mesh_shape: dict, num_layers: int, dropout: float, batch_size: int,
                  accumulation: int) -> Schedule | None:
    """The schedule on a mesh of `mesh_shape` for num_layers layers and batch_size sequences a step in
    `accumulation` accumulation steps, or None without pipeline stages. Refuses in one line what the
    loop cannot run."""
    P, R, L = mesh_shape["pipeline"], pipe.repeats, num_layers
    if P == 1:
        return None
    M = pipe.microbatches or P
    if L % (P * R):
        raise UserError(f"model.num_layers={L} is not divisible by mesh.pipeline × pipeline.repeats = "
                        f"{P}×{R}: every stage of every repeat needs the same number of layers")
    if R > 1 and M < P:
        raise UserError(f"pipeline.microbatches={M} is less than mesh.pipeline={P}: the circular schedule "
                        "(pipeline.repeats > 1) needs at least one micro-batch per stage")
    if M % P:
        raise UserError(f"pipeline.microbatches={M} is not a multiple of mesh.pipeline={P}")
    one_f_one_b = pipe.schedule == "1f1b"
    if one_f_one_b and (R > 1 or dropout):
        raise UserError("pipeline.schedule=1f1b takes pipeline.repeats=1 and model.dropout=0")
    per_step = batch_size // accumulation
    data_parallel = data_parallel_size(mesh_shape)
    if per_step % (M * data_parallel):
        raise UserError(f"train.batch_size={batch_size} / train.microbatches={accumulation} = {per_step} sequences "
                        f"do not split into {M} pipeline micro-batches divisible by data×fsdp={data_parallel}")
    return Schedule(P, M, R, one_f_one_b)


def stage_view(stack_LxW, logical_W, repeats: int, stages: int, constrain):
    """The stack [L, ...] as [R, P, L/(R·P), ...] with the stage axis on `pipeline`: layer
    (r·P + s)·l + j at [r, s, j]. logical_W: each weight's logical axes, as a PartitionSpec."""
    def view(w_LxW, logical):
        w_RxPxlxW = w_LxW.reshape(repeats, stages, -1, *w_LxW.shape[1:])
        return constrain(w_RxPxlxW, (None, "layers", None, *logical[1:]))

    weights, treedef = jax.tree_util.tree_flatten(stack_LxW)
    specs = jax.tree_util.tree_leaves(logical_W, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree_util.tree_unflatten(treedef, [view(w, tuple(s)) for w, s in zip(weights, specs)])


def stage_copies(params, stages: int):
    """Each stage's own copy of `params`, [P, ...], for the embedding and the head that every stage
    runs on its rows: their gradients from all stages are summed once, over `pipeline`, where the
    copies are made. (Each use of one shared array in the stages' vmap would be summed apart: the
    lookup's and the tied head's, twice.)"""
    return jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (stages, *w.shape)), params)


def run(stage_fn, stack_LxW, logical_W, x_PxnxTxD, schedule: Schedule, constrain, batch_split: int = 1, rng=None,
        policy=SAVE_STAGE_INPUTS, bubble_value: float = 0.0):
    """The layer stack applied to each stage's rows x_PxnxTxD (agx.parallel.batch.row_groups) by the pipeline; equal to
    stage_fn(stack_LxW, x_BxTxD, rng) on the batch, and returned in the same rows [P, n, T, D].

    stage_fn(stack_lxW, x_bxTxD, rng) runs consecutive layers; logical_W holds each weight's logical
    axes as a PartitionSpec (its first is 'layers'); constrain(x, logical) pins an array to the
    layout; batch_split: how many ways it splits the batch's rows (Layout.batch_split). rng (or
    None) is folded per iteration and stage. policy: what the backward pass keeps
    of an iteration (None: plain remat, which keeps its inputs). bubble_value fills the stages'
    inputs before their first micro-batch (a test sets NaN).
    """
    P, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    K, N = M // P, R * M + P - 1  # N: GPipe's count, also when evaluating a 1F1B schedule
    _, n, T, D = x_PxnxTxD.shape
    b = n // K

    stack_RxPxlxW = stage_view(stack_LxW, logical_W, R, P, constrain)
    io_logical = ("stage", None, "batch", "act_length", "act_embed")
    state_logical = ("stage", "batch", "act_length", "act_embed")
    # Micro-batch (q, k), in slot row q and column k, takes from each of the S places of a stage's
    # rows the block of b/S rows at k: every device keeps its own rows of every micro-batch, and
    # the finished buffer comes back in the same rows, so that neither end moves a row between
    # devices (each did: XLA gathered the whole buffer to reorder it).
    S = batch_split
    x_PxKxbxTxD = x_PxnxTxD.reshape(P, S, K, b // S, T, D).swapaxes(1, 2).reshape(P, K, b, T, D)
    # The buffer moves one stage onward every iteration, so at iteration t stage 0 reads the slot
    # from row -t mod P: it takes the micro-batches in the order q = 0, P-1, ..., 1 within each k
    # (a reversal of the rows to take them in order is an all-gather; a rotation is a collective-permute).
    io_PxKxbxTxD = constrain(x_PxKxbxTxD, io_logical)
    state_PxbxTxD = constrain(jnp.full((P, b, T, D), bubble_value, x_PxnxTxD.dtype), state_logical)
    stage_P = jnp.arange(P)

    def run_stage(stack_RxlxW, repeat, x_bxTxD, stage_rng):
        stack_lxW = jax.tree_util.tree_map(lambda w: jax.lax.dynamic_index_in_dim(w, repeat, keepdims=False),
                                           stack_RxlxW)
        return stage_fn(stack_lxW, x_bxTxD, stage_rng)

    stages = jax.vmap(run_stage, in_axes=(1, 0, 0, 0), spmd_axis_name="pipeline")

    def iteration(carry, t):
        state_PxbxTxD, io_PxKxbxTxD = carry
        # Stage 0 takes its micro-batch from the buffer; the others take what the stage before made.
        fresh_PxbxTxD = jax.lax.dynamic_index_in_dim(io_PxKxbxTxD, (t // P) % K, axis=1, keepdims=False)
        in_PxbxTxD = jnp.where((stage_P == 0)[:, None, None, None], fresh_PxbxTxD, state_PxbxTxD)
        work_P = t - stage_P  # the (repeat · M + micro-batch) each stage is on
        active_P = (work_P >= 0) & (work_P < R * M)
        in_PxbxTxD = checkpoint_name(jnp.where(active_P[:, None, None, None], in_PxbxTxD, 0), STAGE_INPUT)
        rng_P = jax.random.split(jax.random.fold_in(rng, t), P) if rng is not None else jnp.zeros((P,))
        out_PxbxTxD = stages(stack_RxPxlxW, jnp.clip(work_P // M, 0, R - 1), in_PxbxTxD, rng_P)
        out_PxbxTxD = jnp.where(active_P[:, None, None, None], out_PxbxTxD, jax.lax.stop_gradient(out_PxbxTxD))
        # The last stage puts its finished micro-batch back in that micro-batch's slot.
        finished = t - (P - 1)
        write_PxK = ((stage_P == P - 1)[:, None] & (jnp.arange(K) == (finished // P) % K)[None, :]
                     & (finished >= 0) & (finished < R * M))
        io_PxKxbxTxD = jnp.where(write_PxK[:, :, None, None, None], out_PxbxTxD[:, None], io_PxKxbxTxD)
        # One stage onward: stage s+1 gets stage s's output, and the buffer moves along with it.
        state_PxbxTxD = constrain(jnp.roll(out_PxbxTxD, 1, axis=0), state_logical)
        io_PxKxbxTxD = constrain(jnp.roll(io_PxKxbxTxD, 1, axis=0), io_logical)
        return (state_PxbxTxD, io_PxKxbxTxD), None

    iteration = jax.checkpoint(iteration, policy=policy, prevent_cse=False)
    (_, io_PxKxbxTxD), _ = jax.lax.scan(iteration, (state_PxbxTxD, io_PxKxbxTxD), jnp.arange(N))
    # Slot row q is now in row (q + N) mod P: rotate it back.
    io_PxKxbxTxD = constrain(jnp.roll(io_PxKxbxTxD, -N, axis=0), io_logical)
    y_PxnxTxD = io_PxKxbxTxD.reshape(P, K, S, b // S, T, D).swapaxes(1, 2).reshape(P, n, T, D)
    return constrain(y_PxnxTxD, state_logical)  # its gradient arrives so too
