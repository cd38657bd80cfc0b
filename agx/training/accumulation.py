"""Gradient accumulation fused into the backward pass (Megatron-LM's gradient-accumulation fusion),
for the layer stack under full recompute.

Differentiated by JAX, the scan over the layers returns a micro-batch's gradient of every layer at
once, [L, ...], which the step then adds to its running sum: two gradient-sized buffers. Here the
backward runs the layers itself, last to first, recomputing each from its saved input, and adds each
layer's weight gradient into the running sum in place: the sum is the only gradient-sized buffer.
Under full recompute this is the same computation as JAX's (each layer's forward once more, then
its backward); other remat policies keep activations across the stack, so they are not run here.
With one micro-batch the sum starts at zero, and the step still holds one gradient, not two.

The saved layer inputs are carried through the backward loop, tied by a barrier to the gradient
that changes every iteration, not read as a loop constant: XLA's CPU compiler widens a bf16
dynamic-slice to float32, and hoisted the widening of the whole constant stack out of the loop (an
f32 copy of every layer's input: 9.4 GiB a device for the trillion).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from agx.config import Config
from agx.parallel.padding import unpad_to


def applies(cfg: Config, pipelined: bool) -> bool:
    """Whether the step runs its layers this way: under full recompute, with the layers in the
    model's own loop (not a pipeline's)."""
    return cfg.model.remat == "full" and not pipelined


def run_layers_into(layer, stack_LxW, sum_LxW, x_BxTxD, rngs_L, shapes_LxW, unroll: int = 1):
    """The layers of `stack_LxW` on x, one after another: layer(params, x, rng) -> x, in loops of
    `unroll` layers an iteration. Differentiated, the gradient of `stack_LxW` is `sum_LxW` plus this
    pass's own gradient; `sum_LxW` has none. The stack comes at its stored shapes, as the sum
    (padded where the mesh does not divide it: agx.parallel.padding), and each layer's weights are
    cut to `shapes_LxW`'s where it runs: their gradient comes padded, as the sum is."""
    cut = lambda w: jax.tree_util.tree_map(lambda a, shape: unpad_to(a, shape.shape[1:]), w, shapes_LxW)
    return _run(lambda w, x_BxTxD, rng: layer(cut(w), x_BxTxD, rng), unroll, stack_LxW, sum_LxW, x_BxTxD, rngs_L)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run(layer, unroll, stack_LxW, sum_LxW, x_BxTxD, rngs_L):
    return _forward(layer, unroll, stack_LxW, x_BxTxD, rngs_L)[0]


def _forward(layer, unroll, stack_LxW, x_BxTxD, rngs_L):
    """The output and each layer's input, [L, B, T, D]."""
    step = lambda x_BxTxD, w_and_rng: (layer(w_and_rng[0], x_BxTxD, w_and_rng[1]), x_BxTxD)
    return jax.lax.scan(step, x_BxTxD, (stack_LxW, rngs_L), unroll=unroll)


def _run_forward(layer, unroll, stack_LxW, sum_LxW, x_BxTxD, rngs_L):
    y_BxTxD, inputs_LxBxTxD = _forward(layer, unroll, stack_LxW, x_BxTxD, rngs_L)
    return y_BxTxD, (stack_LxW, sum_LxW, inputs_LxBxTxD, rngs_L)


def _run_backward(layer, unroll, residuals, dy_BxTxD):
    stack_LxW, sum_LxW, inputs_LxBxTxD, rngs_L = residuals
    L = inputs_LxBxTxD.shape[0]

    def step(carry, l):
        dy_BxTxD, sum_LxW, inputs_LxBxTxD = carry
        # tied to the changing gradient, the saved inputs are no loop constant (see the module's doc)
        dy_BxTxD, inputs_LxBxTxD = jax.lax.optimization_barrier((dy_BxTxD, inputs_LxBxTxD))
        w = jax.tree_util.tree_map(lambda a: a[l], stack_LxW)
        _, vjp = jax.vjp(lambda w, x: layer(w, x, rngs_L[l]), w, inputs_LxBxTxD[l])
        dw, dx_BxTxD = vjp(dy_BxTxD)
        sum_LxW = jax.tree_util.tree_map(lambda s, d: s.at[l].add(d), sum_LxW, dw)
        return (dx_BxTxD, sum_LxW, inputs_LxBxTxD), None

    (dx_BxTxD, sum_LxW, _), _ = jax.lax.scan(step, (dy_BxTxD, sum_LxW, inputs_LxBxTxD), jnp.arange(L - 1, -1, -1),
                                             unroll=unroll)
    return sum_LxW, None, dx_BxTxD, None


_run.defvjp(_run_forward, _run_backward)
