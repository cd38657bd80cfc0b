"""The compiled tensor-parallel step holds Megatron's collectives, and never gathers the logits."""

import collections
import math
import re

import jax
import pytest
from conftest import tiny_config

from agx.training.loop import Trainer
from agx.training.step import batch_sharding

B, T, D, V = 16, 32, 64, 2048  # tiny_config's batch, sequence, width and padded vocabulary
COLLECTIVE = re.compile(r"= \w+\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")


def collectives(sequence_parallel: bool) -> collections.Counter:
    """(op, shape) -> count in the HLO of the step compiled for tensor=8; loop bodies count once."""
    trainer = Trainer.build(tiny_config(tensor=8, zero_stage=0, sequence_parallel=sequence_parallel))
    tokens = jax.ShapeDtypeStruct((B, T + 1), "int32", sharding=batch_sharding(trainer.mesh))
    hlo = trainer.step_fn.lower(trainer.plan.abstract, tokens).compile().as_text()
    return collections.Counter((op, tuple(int(d) for d in shape.split(",") if d))
                               for shape, op in COLLECTIVE.findall(hlo))


def activation_sized(ops: collections.Counter, op: str) -> int:
    """How many `op`s move a whole [B, T, D] activation (in any shape, e.g. [B·T, D])."""
    return sum(n for (kind, shape), n in ops.items() if kind == op and math.prod(shape) == B * T * D)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_no_collective_moves_whole_logits(sequence_parallel):
    # Nothing as large as the [B, T, V] logits (or the [B, T, 4D] MLP activations) is ever moved.
    for (op, shape), _ in collectives(sequence_parallel).items():
        assert math.prod(shape) < B * T * V, (op, shape)


def test_megatron_tensor_parallel_collectives():
    ops = collectives(sequence_parallel=False)
    # Per layer: all-reduce after the row-parallel attention output and MLP output (forward), and of
    # the input gradients of the column-parallel QKV and fc (backward); plus the vocab-parallel
    # embedding (forward) and LM head (backward).
    assert activation_sized(ops, "all-reduce") == 6
    # Vocab-parallel cross-entropy reduces max and sum over the vocabulary shards: [B, T] only.
    assert ops[("all-reduce", (B, T))] >= 2
    # Weights are split, never gathered, in pure tensor parallelism.
    assert not [key for key in ops if key[0] == "all-gather"]


def test_sequence_parallel_gathers_activations_along_the_sequence():
    ops = collectives(sequence_parallel=True)
    # Megatron SP: the LayerNorm output is gathered along the sequence before QKV and fc, in both
    # passes, and the row-parallel outputs are reduced back to sequence shards.
    assert ops[("all-gather", (B, T, D))] >= 4
    assert activation_sized(ops, "all-reduce") + ops[("reduce-scatter", (B, T // 8, D))] >= 4
