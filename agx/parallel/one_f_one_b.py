"""The 1F1B pipeline schedule: forward and backward interleaved, so that a stage keeps at most
2P-1 micro-batches' inputs instead of one per loop iteration.

One loop over ticks runs every stage at once (vmap over stages, spmd_axis_name='pipeline', as in
agx.parallel.pipeline). At tick t stage s runs the forward of micro-batch t-s and the backward of
micro-batch t-(2P-2-s), the latter by jax.vjp from the input it stashed, then the forward outputs
move one stage on and the input gradients one stage back: two rotations, two collective-permutes.
The embedding (at stage 0) and the head and loss (at the last stage) run inside the loop, one
micro-batch at a time, so no whole-batch activation is ever held; each stage with its own copy of
their weights, whose gradient it adds up there without a collective, reduced once by whoever made
the copies. The gradients are computed by hand, inside a custom_vjp whose primal is the plain
forward: autodiff outside sees a loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agx.parallel.batch import split_microbatches
from agx.parallel.pipeline import Schedule, stage_view


def loss(embed_fn, stage_fn, head_loss_fn, params_P, stack_LxW, logical_W, tokens_BxT, targets_BxT,
         schedule: Schedule, constrain):
    """Mean head_loss_fn over the batch of embed -> stack -> head, with 1F1B gradients.

    embed_fn(params, tokens_bxT) -> x_bxTxD; stage_fn(stack_lxW, x_bxTxD) -> y_bxTxD;
    head_loss_fn(params, y_bxTxD, targets_bxT) -> mean loss. `params_P` holds everything but the
    stack, one copy a stage [P, ...] (pipeline.stage_copies, or agx.parallel.weight_gradient's
    gathered_copies over `pipeline`), whose gradient comes back per stage.
    """
    P, M = schedule.stages, schedule.microbatches

    @jax.custom_vjp
    def forward_loss(params_P, stack_LxW, tokens_BxT, targets_BxT):
        params = jax.tree_util.tree_map(lambda w: w[0], params_P)
        return head_loss_fn(params, stage_fn(stack_LxW, embed_fn(params, tokens_BxT)), targets_BxT)

    def with_gradients(params_P, stack_LxW, tokens_BxT, targets_BxT):
        stack_PxlxW = jax.tree_util.tree_map(lambda w: w[0], stage_view(stack_LxW, logical_W, 1, P, constrain))
        value, grads = _ticks(embed_fn, stage_fn, head_loss_fn, params_P, stack_PxlxW,
                              split_microbatches(tokens_BxT, M),
                              split_microbatches(targets_BxT, M), P, M, constrain)
        d_params, d_stack_PxlxW = grads
        d_stack_LxW = jax.tree_util.tree_map(lambda g, w: g.reshape(w.shape), d_stack_PxlxW, stack_LxW)
        return value, (d_params, d_stack_LxW)

    def backward(grads, g):
        d_params, d_stack = jax.tree_util.tree_map(lambda x: g * x, grads)
        return d_params, d_stack, None, None

    forward_loss.defvjp(with_gradients, backward)
    return forward_loss(params_P, stack_LxW, tokens_BxT, targets_BxT)


def _ticks(embed_fn, stage_fn, head_loss_fn, params_P, stack_PxlxW, tokens_MxbxT, targets_MxbxT, P, M, constrain):
    """(mean loss, (d params_P, d stack [P, l, ...])) by the 1F1B loop."""
    S = 2 * P - 1  # stash slots: stage 0 holds a micro-batch from its forward for 2P-2 ticks
    stage_P = jnp.arange(P)
    state_logical = ("stage", "batch", "act_length", "act_embed")
    stash_logical = ("stage", None, "batch", "act_length", "act_embed")
    activation = jax.eval_shape(embed_fn, jax.tree_util.tree_map(lambda w: w[0], params_P),
                                tokens_MxbxT[0])  # one micro-batch's [b, T, D]
    pick = lambda a_M, i_P: jax.vmap(lambda i: a_M[i])(jnp.clip(i_P, 0, M - 1))  # per stage, from a replicated array
    per_stage = lambda f, in_axes: jax.vmap(f, in_axes=in_axes, spmd_axis_name="pipeline")

    def embed_vjp(params, tokens_bxT, dx_bxTxD):
        return jax.vjp(lambda p: embed_fn(p, tokens_bxT), params)[1](dx_bxTxD)[0]

    def stage_vjp(stack_lxW, x_bxTxD, dy_bxTxD):
        return jax.vjp(stage_fn, stack_lxW, x_bxTxD)[1](dy_bxTxD)

    head = jax.value_and_grad(lambda p, y, t: head_loss_fn(p, y, t) / M, argnums=(0, 1))

    def tick(carry, t):
        forward_in_P, backward_in_P, stash_PxS, loss_P, d_params_P, d_stack_P = carry
        # Forward of micro-batch t - s: stage 0 embeds it, the others take the stage before's output.
        f_P = t - stage_P
        forward_on_P = (f_P >= 0) & (f_P < M)
        x_P = per_stage(embed_fn, (0, 0))(params_P, pick(tokens_MxbxT, f_P))
        x_P = jnp.where(_expand(stage_P == 0), x_P, forward_in_P)
        x_P = jnp.where(_expand(forward_on_P), x_P, 0)
        stash_PxS = jnp.where(_expand((jnp.arange(S) == (f_P % S)[:, None]) & forward_on_P[:, None], 5),
                              x_P[:, None], stash_PxS)
        y_P = per_stage(stage_fn, (0, 0))(stack_PxlxW, x_P)
        # The last stage's micro-batch goes through the head and the loss at once.
        last_P = (stage_P == P - 1) & forward_on_P
        step_loss_P, (d_head_P, dy_P) = per_stage(head, (0, 0, 0))(params_P, y_P, pick(targets_MxbxT, f_P))
        loss_P = loss_P + jnp.where(last_P, step_loss_P, 0)
        d_params_P = jax.tree_util.tree_map(lambda acc, g: acc + jnp.where(_expand(last_P, g.ndim), g, 0),
                                            d_params_P, d_head_P)
        # Backward of micro-batch t - (2P - 2 - s), from its stashed input.
        k_P = t - (2 * P - 2 - stage_P)
        backward_on_P = (k_P >= 0) & (k_P < M)
        dy_P = jnp.where(_expand(stage_P == P - 1), dy_P, backward_in_P)
        dy_P = jnp.where(_expand(backward_on_P), dy_P, 0)
        saved_P = jax.vmap(lambda stash, k: stash[k])(stash_PxS, k_P % S)
        saved_P = jnp.where(_expand(backward_on_P), saved_P, 0)
        d_layers_P, dx_P = per_stage(stage_vjp, (0, 0, 0))(stack_PxlxW, saved_P, dy_P)
        d_stack_P = jax.tree_util.tree_map(jnp.add, d_stack_P, d_layers_P)  # idle stages add exact zeros
        # Stage 0 hands its input gradient to the embedding.
        d_embed_P = per_stage(embed_vjp, (0, 0, 0))(params_P, pick(tokens_MxbxT, k_P),
                                                      jnp.where(_expand(stage_P == 0), dx_P, 0))
        d_params_P = jax.tree_util.tree_map(jnp.add, d_params_P, d_embed_P)
        forward_in_P = constrain(jnp.roll(y_P, 1, axis=0), state_logical)
        backward_in_P = constrain(jnp.roll(dx_P, -1, axis=0), state_logical)
        return (forward_in_P, backward_in_P, constrain(stash_PxS, stash_logical), loss_P, d_params_P, d_stack_P), None

    state = constrain(jnp.zeros((P, *activation.shape), activation.dtype), state_logical)
    stash = constrain(jnp.zeros((P, S, *activation.shape), activation.dtype), stash_logical)
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    carry = (state, state, stash, jnp.zeros((P,)), zeros(params_P), zeros(stack_PxlxW))
    (_, _, _, loss_P, d_params_P, d_stack_P), _ = jax.lax.scan(tick, carry, jnp.arange(M + 2 * P - 2))
    return loss_P.sum(), (d_params_P, d_stack_P)


def _expand(mask, ndim: int = 4):
    """A per-stage mask (or [stage, slot] mask) with trailing axes for an array of `ndim` dimensions."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))
