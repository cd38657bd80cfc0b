"""GPT-3's optimizer: AdamW (β 0.9/0.95, eps 1e-8, decay 0.1), linear warm-up, cosine decay to 10%,
global-norm clipping at 1.0. Biases, LayerNorm weights and embeddings are not decayed."""

from __future__ import annotations

import jax
import optax

from agx.config import Config


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


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )
