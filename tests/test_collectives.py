"""The compiled tensor-parallel step holds Megatron's collectives, and never gathers the logits;
for the Llama architecture too, with the KV heads split over `tensor` or whole on every rank."""

import collections
import math
import re

import jax
import pytest
from conftest import llama_tiny_config, tiny_config

from agx.training.loop import Trainer
from agx.training.step import batch_sharding

B, T, D, V = 16, 32, 64, 2048  # tiny_config's batch, sequence, width and padded vocabulary
# An instruction's result (one array, or a tuple of them when XLA combines collectives) and its op
COLLECTIVE = re.compile(r"= (\w+\[[\d,]*\][^ ]*|\([^)]*\)) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")
SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def collectives(sequence_parallel: bool, make_config=tiny_config, tensor: int = 8) -> collections.Counter:
    """(op, shape) -> count in the HLO of the step compiled for `tensor` devices; loop bodies count
    once."""
    cfg = make_config(tensor=tensor, zero_stage=0, sequence_parallel=sequence_parallel)
    trainer = Trainer.build(cfg, jax.devices()[:tensor])
    tokens = jax.ShapeDtypeStruct((B, T + 1), "int32", sharding=batch_sharding(trainer.mesh))
    hlo = trainer.step_fn.lower(trainer.plan.abstract, tokens).compile().as_text()
    return collections.Counter((op, tuple(int(d) for d in shape.split(",") if d))
                               for result, op in COLLECTIVE.findall(hlo) for shape in SHAPE.findall(result))


def activation_sized(ops: collections.Counter, op: str) -> int:
    """How many `op`s move a whole [B, T, D] activation (in any shape, e.g. [B·T, D])."""
    return sum(n for (kind, shape), n in ops.items() if kind == op and math.prod(shape) == B * T * D)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_no_collective_moves_whole_logits(sequence_parallel):
    # Nothing as large as the [B, T, V] logits (or the [B, T, 4D] MLP activations) is ever moved.
    for (op, shape), _ in collectives(sequence_parallel).items():
        assert math.prod(shape) < B * T * V, (op, shape)


@pytest.mark.parametrize("make_config,tensor", [(tiny_config, 8), (llama_tiny_config, 2), (llama_tiny_config, 8)],
                         ids=["gpt3", "llama-kv-split", "llama-kv-whole"])
def test_megatron_tensor_parallel_collectives(make_config, tensor):
    ops = collectives(sequence_parallel=False, make_config=make_config, tensor=tensor)
    # Per layer: all-reduce after the row-parallel attention output and MLP output (forward), and of
    # the input gradients of the column-parallel QKV and fc (backward); plus the vocab-parallel
    # embedding (forward) and LM head (backward). Grouped-query attention with its KV heads split
    # projects Q, K and V in one matmul of the regrouped weights, as Megatron's fused layout does, so
    # their input gradients are summed before the one reduction. With the KV heads whole, every rank
    # computes the KV input gradient in full, and only Q's is reduced.
    cfg = make_config().model
    kv_split = cfg.kv_heads % tensor == 0
    assert activation_sized(ops, "all-reduce") == 6
    # Vocab-parallel cross-entropy reduces max and sum over the vocabulary shards: [B, T] only.
    assert ops[("all-reduce", (B, T))] >= 2
    # Weights are split, never gathered, in pure tensor parallelism. KV heads kept whole on every
    # rank get their activation gradient summed over the ranks' query heads: all-gathers of the
    # [B, K, T, Q] keys' and values' gradients (jax 0.5 gathers the rotary halves), no larger.
    kv_size = 0 if kv_split else B * T * cfg.kv_heads * cfg.head_dim
    gathers = [shape for op, shape in ops if op == "all-gather"]
    assert all(shape[0] == B and math.prod(shape) <= kv_size for shape in gathers), gathers


def test_sequence_parallel_gathers_activations_along_the_sequence():
    ops = collectives(sequence_parallel=True)
    # Megatron SP: the LayerNorm output is gathered along the sequence before QKV and fc, in both
    # passes, and the row-parallel outputs are reduced back to sequence shards.
    assert ops[("all-gather", (B, T, D))] >= 4
    assert activation_sized(ops, "all-reduce") + ops[("reduce-scatter", (B, T // 8, D))] >= 4
