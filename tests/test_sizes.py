"""Named sizes: parameter counts against GPT-3 Table 2.1 and the abstract tree; FLOPs against XLA."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config

from agx.config import load_experiment
from agx.models.configs import PUBLISHED, flops_per_token, param_count
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


def test_flops_per_token_matches_xla_cost_of_a_training_step():
    """XLA counts the FLOPs it compiles; the formula counts matmuls only, so they agree closely.
    One layer: XLA's cost analysis counts a loop body once, whatever its trip count."""
    cfg = dataclasses.replace(tiny_config().model, num_layers=1)
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
