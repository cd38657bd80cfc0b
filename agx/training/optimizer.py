"""GPT-3's optimizer: AdamW (β 0.9/0.95, eps 1e-8, decay 0.1), linear warm-up, cosine decay to 10%,
global-norm clipping at 1.0. Biases, LayerNorm weights and embeddings are not decayed.

Written out rather than chained from optax so that the update runs in place: each weight and each
moment is read by one computation only, the one that overwrites it. The moments are updated first
and the weights from the new moments, with a barrier between, so the compiler cannot recompute the
new moments from the old ones inside the weights' update. Left to XLA, the old moments had a second
reader, and XLA copied them (two moment-sized copies per weight: 15 GiB a device for the trillion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agx.config import Config, OptimConfig


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Learning rate of step `count` (0-based), Megatron's way: step i of W warm-up steps uses lr·i/W
    (never zero), then a cosine to lr·min_lr_ratio at step `decay_steps`, flat after."""
    o = cfg.optim
    decay_steps = o.decay_steps or cfg.train.steps
    warmup = min(o.warmup_steps, decay_steps)
    by_iteration = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup, decay_steps=max(decay_steps, warmup + 1),
        end_value=o.lr * o.min_lr_ratio)
    return lambda count: by_iteration(count + 1)


def decay_mask(params):
    """Only matmul kernels are decayed (Megatron's no-weight-decay list: biases, norms, embeddings)."""
    def is_kernel(path, _):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


class AdamWState(NamedTuple):
    count: jax.Array  # steps taken, skipped ones not: the schedule's position and Adam's bias correction
    mu: Any  # first moments, shaped as the parameters
    nu: Any  # second moments


@dataclass(frozen=True)
class AdamW:
    optim: OptimConfig
    schedule: optax.Schedule

    def init(self, params) -> AdamWState:
        zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
        return AdamWState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    def apply(self, grads, grad_norm, state: AdamWState, params, take=True):
        """(params, state) after one step on `grads`, whose global norm is `grad_norm`; where `take`
        is false, the same (params, state): a skipped step."""
        o = self.optim
        scale = jnp.where(grad_norm < o.grad_clip, 1.0, o.grad_clip / grad_norm)  # optax's clip_by_global_norm
        keep = lambda new, old: jnp.where(take, new, old)
        moment = lambda b, power: lambda old, g: keep(b * old + (1 - b) * (g * scale) ** power, old)
        mu = jax.tree_util.tree_map(moment(o.b1, 1), state.mu, grads)
        nu = jax.tree_util.tree_map(moment(o.b2, 2), state.nu, grads)
        mu, nu = jax.lax.optimization_barrier((mu, nu))  # the weights' update reads the moments' new buffers
        count = state.count + jnp.asarray(take, jnp.int32)
        lr, t = self.schedule(state.count), count.astype(jnp.float32)
        first, second = 1 - o.b1 ** t, 1 - o.b2 ** t  # bias corrections

        def step(p, m, v, decayed):
            update = (m / first) / (jnp.sqrt(v / second) + o.eps) + (o.weight_decay * p if decayed else 0.0)
            return keep(p - lr * update, p)

        params = jax.tree_util.tree_map(step, params, mu, nu, decay_mask(params))
        return params, AdamWState(count, mu, nu)


def make_optimizer(cfg: Config) -> AdamW:
    return AdamW(cfg.optim, lr_schedule(cfg))
