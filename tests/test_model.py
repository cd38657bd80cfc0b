"""The Flax model against a plain-JAX GPT-3 written from the paper: causality, blocked attention,
initialisation, bf16, dropout and the loss over a padded vocabulary."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from conftest import ARCHITECTURES, tiny_config

from agx.models.gpt import GPT, Block
from agx.models.loss import cross_entropy

CFG = tiny_config().model


@pytest.fixture(scope="module")
def params():
    tokens = jnp.zeros((1, CFG.seq_len), jnp.int32)
    return nn.meta.unbox(jax.jit(GPT(CFG).init)(jax.random.key(1), tokens)["params"])


def reference_gpt(p, tokens_BxT, cfg):
    """GPT-3 forward pass straight from the paper, one layer at a time, no Flax."""

    def layer_norm(x, ln):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]

    B, T = tokens_BxT.shape
    x = p["wte"]["embedding"][tokens_BxT] + p["wpe"][:T]
    for i in range(cfg.num_layers):
        lp = jax.tree_util.tree_map(lambda a: a[i], p["layers"])
        h = layer_norm(x, lp["ln_attn"])
        qkv = jnp.einsum("btd,dchq->cbthq", h, lp["qkv"]["kernel"]) + lp["qkv"]["bias"][:, None, None]
        q, k, v = qkv
        scores = jnp.einsum("bthq,bshq->bhts", q, k) / math.sqrt(cfg.head_dim)
        scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        ctx = jnp.einsum("bhts,bshq->bthq", jax.nn.softmax(scores, -1), v)
        x = x + jnp.einsum("bthq,hqd->btd", ctx, lp["proj"]["kernel"]) + lp["proj"]["bias"]
        h = layer_norm(x, lp["ln_mlp"])
        g = h @ lp["fc"]["kernel"] + lp["fc"]["bias"]
        gelu = 0.5 * g * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + gelu @ lp["out"]["kernel"] + lp["out"]["bias"]
    return layer_norm(x, p["ln_f"]) @ p["wte"]["embedding"].T


def random_tokens(seed=0, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, CFG.seq_len), 0, CFG.vocab_size)


def test_matches_a_plain_implementation_of_the_paper(params):
    # Perturb the zero-initialised biases and unit LayerNorms so that every term is exercised.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    tokens = random_tokens()
    np.testing.assert_allclose(GPT(CFG).apply({"params": params}, tokens), reference_gpt(params, tokens, CFG),
                               rtol=2e-4, atol=2e-4)


def test_is_causal(params):
    tokens = random_tokens()
    changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % CFG.vocab_size)
    logits, logits_changed = (GPT(CFG).apply({"params": params}, t) for t in (tokens, changed))
    np.testing.assert_array_equal(logits[:, :20], logits_changed[:, :20])
    assert not np.allclose(logits[:, 20:], logits_changed[:, 20:])


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_block_causal_attention_equals_the_dense_masked_product(architecture, block):
    """model.attention_block skips the blocks above the diagonal: the loss and every gradient equal
    the dense masked attention's (GPT-3, and Llama with rotary positions and 2 KV heads)."""
    dense = ARCHITECTURES[architecture]().model
    blocked = dataclasses.replace(dense, attention_block=block)
    tokens = jax.random.randint(jax.random.key(4), (2, dense.seq_len + 1), 0, dense.vocab_size)
    params = nn.meta.unbox(GPT(dense).init(jax.random.key(3), tokens[:, :-1])["params"])

    def loss_and_grads(cfg):
        loss = lambda p: cross_entropy(GPT(cfg).apply({"params": p}, tokens[:, :-1]), tokens[:, 1:], cfg.vocab_size)
        return jax.jit(jax.value_and_grad(loss))(params)

    (dense_loss, dense_grads), (blocked_loss, blocked_grads) = loss_and_grads(dense), loss_and_grads(blocked)
    np.testing.assert_allclose(blocked_loss, dense_loss, rtol=1e-6)
    jax.tree_util.tree_map_with_path(
        lambda path, want, got: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(path)),
        dense_grads, blocked_grads)


@pytest.mark.parametrize("block", [8, 16])
def test_block_causal_attention_skips_the_blocks_above_the_diagonal(block):
    """XLA's count of the attention's FLOPs, forward and backward, falls to the share of blocks
    kept, (1 + C/T)/2: the masked blocks are not computed."""
    q_BxHxTxQ = jnp.ones((2, CFG.num_heads, CFG.seq_len, CFG.head_dim))

    def attention_flops(cfg, grad):
        attention = lambda q, k, v: Block(cfg, None, True)._causal_attention(q, k, v)[0].sum()
        fn = jax.grad(attention, argnums=(0, 1, 2)) if grad else attention
        cost = jax.jit(fn).lower(q_BxHxTxQ, q_BxHxTxQ, q_BxHxTxQ).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    for grad in (False, True):
        kept = attention_flops(dataclasses.replace(CFG, attention_block=block), grad) / attention_flops(CFG, grad)
        assert kept == pytest.approx((1 + block / CFG.seq_len) / 2, rel=0.05)


def test_gpt2_initialisation(params):
    layers = params["layers"]
    assert np.std(params["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(layers["qkv"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * CFG.num_layers)
    assert np.std(layers["proj"]["kernel"]) == pytest.approx(residual_std, rel=0.05)
    assert np.std(layers["out"]["kernel"]) == pytest.approx(residual_std, rel=0.05)
    assert not np.any(layers["fc"]["bias"]) and np.all(layers["ln_mlp"]["scale"] == 1)
    # Each layer draws its own weights.
    assert not np.allclose(layers["fc"]["kernel"][0], layers["fc"]["kernel"][1])


def test_bf16_compute_keeps_fp32_params_and_logits(params):
    logits = GPT(dataclasses.replace(CFG, dtype="bfloat16")).apply({"params": params}, random_tokens())
    assert logits.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(logits, GPT(CFG).apply({"params": params}, random_tokens()), atol=0.05)


def test_dropout_is_random_in_training_and_off_in_eval(params):
    model = GPT(dataclasses.replace(CFG, dropout=0.1))
    tokens = random_tokens()
    train = [model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(s)})
             for s in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), GPT(CFG).apply({"params": params}, tokens))


def test_cross_entropy_ignores_vocabulary_padding():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 8))
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    padded = jnp.concatenate([logits, jnp.full((2, 3, 4), 30.0)], axis=-1)  # large logits on padding
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    assert float(cross_entropy(padded, targets, vocab_size=8)) == pytest.approx(float(want), rel=1e-6)
