"""GPT-3's optimizer: AdamW against a hand computation and against optax's, weight decay on the
matmul kernels only, the learning-rate schedule, clipping to a global norm of one, skipped steps,
and an update that runs in place."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from conftest import tiny_config

from agx.models.gpt import GPT
from agx.training.optimizer import decay_mask, lr_schedule, make_optimizer

CFG = tiny_config().model


def test_weight_decay_applies_to_matmul_kernels_only():
    tokens = jnp.zeros((1, CFG.seq_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(GPT(CFG).init, jax.random.key(1), tokens)["params"])
    mask = decay_mask(params)
    assert mask["layers"]["qkv"]["kernel"] and mask["layers"]["fc"]["kernel"]
    assert not mask["wte"]["embedding"] and not mask["wpe"] and not mask["layers"]["fc"]["bias"]
    assert not mask["layers"]["ln_attn"]["scale"] and not mask["ln_f"]["bias"]


def test_gpt3_schedule_warms_up_linearly_then_decays_to_ten_percent():
    cfg = tiny_config()
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-3, warmup_steps=10, decay_steps=110)
    schedule = lr_schedule(cfg)  # schedule(s): the rate of the (s+1)-th step
    assert float(schedule(0)) == pytest.approx(1e-4)  # the first step already moves the weights
    assert float(schedule(4)) == pytest.approx(5e-4)
    assert float(schedule(9)) == pytest.approx(1e-3)
    assert float(schedule(59)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)  # half-way down the cosine
    assert float(schedule(109)) == pytest.approx(1e-4) and float(schedule(500)) == pytest.approx(1e-4)


def test_adamw_update_matches_hand_computation():
    cfg = tiny_config()
    cfg.optim = dataclasses.replace(cfg.optim, lr=0.1, warmup_steps=0, decay_steps=1000, grad_clip=1e9)
    params = {"dense": {"kernel": jnp.array([1.0, -2.0])}, "ln": {"scale": jnp.array([1.0])}}
    grads = {"dense": {"kernel": jnp.array([0.5, 0.5])}, "ln": {"scale": jnp.array([0.5])}}
    tx = make_optimizer(cfg)
    updates = jax.tree_util.tree_map(jnp.subtract, step(tx, params, grads)[0], params)
    # First Adam step: m̂ = g, v̂ = g², so the step is lr·(g/(|g|+eps)) plus decoupled decay lr·wd·w.
    # (rtol 1e-5: one step into a 1000-step cosine, the rate is 0.1·(1 - 2e-6))
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * (1 + 0.1 * np.array([1.0, -2.0])), rtol=1e-5)
    np.testing.assert_allclose(updates["ln"]["scale"], [-0.1], rtol=1e-5)


def test_gradients_are_clipped_to_global_norm_one():
    # With a huge eps, Adam's first step is lr·g/(|g|+eps): proportional to the gradient it was given.
    cfg = tiny_config()
    cfg.optim = dataclasses.replace(cfg.optim, lr=1.0, warmup_steps=0, decay_steps=1000, eps=1e3, weight_decay=0.0)
    tx = make_optimizer(cfg)
    params, grads = {"kernel": jnp.zeros(2)}, {"kernel": jnp.array([3.0, 4.0])}  # global norm 5
    updates = step(tx, params, grads)[0]
    clipped = np.array([0.6, 0.8])
    np.testing.assert_allclose(updates["kernel"], -clipped / (clipped + 1e3), rtol=1e-5)


def step(tx, params, grads, state=None, take=True):
    state = tx.init(params) if state is None else state
    return tx.apply(grads, optax.tree_utils.tree_norm(grads), state, params, take)


def test_steps_match_optax_adamw_with_clipping_and_skipped_steps_change_nothing():
    """Five steps of random gradients, some clipped, against optax's chain of clip_by_global_norm and
    adamw with the same mask and schedule; a skipped step returns its inputs and leaves the count."""
    cfg = tiny_config()
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-2, warmup_steps=2, decay_steps=10)
    tx = make_optimizer(cfg)
    reference = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip),
                            optax.adamw(lr_schedule(cfg), b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps,
                                        weight_decay=cfg.optim.weight_decay, mask=decay_mask))
    keys = iter(jax.random.split(jax.random.key(0), 12))
    params = {"fc": {"kernel": jax.random.normal(next(keys), (4, 3)), "bias": jax.random.normal(next(keys), (3,))}}
    ours, theirs, state, ref_state = params, params, tx.init(params), reference.init(params)
    for i in range(5):
        grads = jax.tree_util.tree_map(lambda p: (0.1 + i) * jax.random.normal(next(keys), p.shape), params)
        ours, state = step(tx, ours, grads, state)
        updates, ref_state = reference.update(grads, ref_state, theirs)
        theirs = optax.apply_updates(theirs, updates)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), ours, theirs)
    skipped, skipped_state = step(tx, ours, grads, state, take=jnp.array(False))
    assert int(skipped_state.count) == int(state.count) == 5
    for a, b in zip(jax.tree_util.tree_leaves((skipped, skipped_state)), jax.tree_util.tree_leaves((ours, state))):
        np.testing.assert_array_equal(a, b)


def test_the_update_overwrites_weights_and_moments_without_copying_them():
    """Donated, each weight and moment is read only by the computation that overwrites it: the
    compiled update needs no temporary the size of a weight (XLA copied the old moments, which the
    weights' update read too, before the moments were updated before the weights)."""
    cfg = tiny_config()
    tx = make_optimizer(cfg)
    params = {"fc": {"kernel": jnp.zeros((512, 1024))}}  # 2 MiB a buffer
    state = tx.init(params)
    # the gradient's norm given: jax 0.5.0's XLA squares the gradient into a temporary to sum it
    update = jax.jit(lambda p, s, g, norm: tx.apply(g, norm, s, p), donate_argnums=(0, 1))
    temporaries = update.lower(params, state, params, jnp.float32(1)).compile().memory_analysis().temp_size_in_bytes
    assert temporaries < 512 * 1024 * 4 / 2, f"{temporaries} bytes of temporaries"
