"""Named sizes: parameter counts against GPT-3 Table 2.1, a count by hand and the abstract tree;
FLOPs against XLA and against each other."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from conftest import llama_tiny_config, tiny_config

from agx.config import load_experiment
from agx.models.sizes import flops_per_token, megatron_flops_per_token, param_count
from agx.recipes import AURORAGPT, PUBLISHED
from agx.models.gpt import GPT
from agx.training.step import cross_entropy


def abstract_param_count(model_cfg) -> int:
    tokens = jax.ShapeDtypeStruct((1, model_cfg.seq_len), jnp.int32)
    params = jax.eval_shape(lambda t: GPT(model_cfg).init(jax.random.key(0), t), tokens)["params"]
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_paper_and_model(name):
    cfg = load_experiment(name).model
    assert param_count(cfg) == abstract_param_count(cfg)
    # Table 2.1 rounds (and names Medium "350M" for 356M); padding the vocabulary adds 0.01-0.04%.
    assert param_count(cfg) == pytest.approx(PUBLISHED[name].params, rel=0.02)


@pytest.mark.parametrize("name", sorted(AURORAGPT))
def test_auroragpt_param_counts_match_a_count_by_hand_and_the_model(name):
    s, cfg = AURORAGPT[name], load_experiment(name).model
    kv_width = s.d_model // s.heads * s.kv_heads
    per_layer = (2 * s.d_model * s.d_model  # q and o
                 + 2 * s.d_model * kv_width  # k and v: grouped-query attention
                 + 3 * s.d_model * s.ffn  # gate, up, down
                 + 2 * s.d_model)  # two RMSNorm scales, no biases anywhere
    by_hand = 2 * s.vocab * s.d_model + s.layers * per_layer + s.d_model  # untied embedding and head, final norm
    assert param_count(cfg) == abstract_param_count(cfg) == by_hand
    assert by_hand / 1e9 == pytest.approx(s.params / 1e9, abs=0.005)  # 1.99B, 5.93B, 68.98B


def test_megatron_flops_agree_with_palm_for_gpt3_and_count_the_matmuls_of_llama():
    """Megatron-DeepSpeed's formula leaves out the embedding lookup and the learned positions, which
    PaLM's 6N counts; for GPT-3 175B that is 0.02%. For Llama it is 6 × the matmul weights (q, k, v,
    o, gate, up, down and the head) plus the attention scores and sums, 12·L·d·T."""
    gpt3 = load_experiment("gpt3_175b").model
    assert megatron_flops_per_token(gpt3) == pytest.approx(flops_per_token(gpt3), rel=3e-4)
    m = load_experiment("auroragpt_7b").model
    matmul_weights = param_count(m) - m.padded_vocab * m.d_model - m.num_layers * 2 * m.d_model - m.d_model
    assert flops_per_token(m) == 6 * matmul_weights + 12 * m.num_layers * m.d_model * m.seq_len


@pytest.mark.parametrize("make_config", [tiny_config, llama_tiny_config], ids=["gpt3", "llama"])
def test_flops_per_token_matches_xla_cost_of_a_training_step(make_config):
    """XLA counts the FLOPs it compiles; the formula counts matmuls only, so they agree closely.
    One layer: XLA's cost analysis counts a loop body once, whatever its trip count."""
    cfg = dataclasses.replace(make_config().model, num_layers=1)
    tokens = jnp.zeros((8, cfg.seq_len), jnp.int32)
    model = GPT(cfg)
    params = model.init(jax.random.key(0), tokens)

    targets = jax.random.randint(jax.random.key(1), tokens.shape, 0, cfg.vocab_size)

    def loss(p):  # a real loss: a constant cotangent would let XLA fold the LM head's backward matmul
        return cross_entropy(model.apply(p, tokens), targets, cfg.vocab_size)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops_per_token = cost["flops"] / tokens.size
    assert xla_flops_per_token == pytest.approx(flops_per_token(cfg), rel=0.15)
