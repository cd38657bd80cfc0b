"""GPT-3's optimizer: AdamW against a hand computation, weight decay on the matmul kernels only,
the learning-rate schedule, and clipping to a global norm of one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
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
    updates, _ = tx.update(grads, tx.init(params), params)
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
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = np.array([0.6, 0.8])
    np.testing.assert_allclose(updates["kernel"], -clipped / (clipped + 1e3), rtol=1e-5)
