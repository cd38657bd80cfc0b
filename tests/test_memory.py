"""Per-device bytes of the actual parameter and optimizer-state shards follow the ZeRO stage and mesh."""

import math

import jax
import pytest
from conftest import tiny_config

from agx.training.loop import Trainer


def bytes_on_device(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


def total_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


def measure(zero_stage, data=1, fsdp=1, tensor=1):
    trainer = Trainer.build(tiny_config(data=data, fsdp=fsdp, tensor=tensor, zero_stage=zero_stage))
    state = trainer.init()
    device = jax.devices()[0]
    # Gradients live only inside the step, constrained to these shardings: count their shard shapes.
    grad_elements = sum(math.prod(sharding.shard_shape(param.shape)) for param, sharding in zip(
        jax.tree_util.tree_leaves(trainer.plan.abstract.params), jax.tree_util.tree_leaves(trainer.plan.grad_shardings)))
    return (bytes_on_device(state.params, device) / total_bytes(state.params),
            bytes_on_device(state.opt_state, device) / total_bytes(state.opt_state),
            grad_elements / trainer.plan.num_params)


# Biases and LayerNorm vectors without an 'embed' axis stay replicated: at most ~2% of this model.
SHARDED = pytest.approx(1 / 8, abs=0.02)


def test_zero_stages_over_data():
    params, opt, grads = zip(*[measure(stage, data=8) for stage in range(4)])
    assert params[:3] == (1.0, 1.0, 1.0) and params[3] == SHARDED
    assert opt[0] == 1.0 and opt[1:] == (SHARDED,) * 3
    assert grads[:2] == (1.0, 1.0) and grads[2:] == (SHARDED,) * 2


def test_fsdp_shards_everything_at_any_stage():
    for stage in (0, 3):
        assert measure(stage, fsdp=8) == (SHARDED, SHARDED, SHARDED)


def test_tensor_parallel_splits_the_matrices():
    # The position table, LayerNorms and the row-parallel biases are replicated (Megatron's too).
    assert measure(0, tensor=8) == pytest.approx((1 / 8, 1 / 8, 1 / 8), abs=0.05)
    # ZeRO-3 over data on top of tensor=4: a further 2×.
    assert measure(3, data=2, tensor=4)[0] == pytest.approx(1 / 8, abs=0.05)


def test_accumulating_micro_batches_adds_no_gradient_sized_buffer_under_full_recompute():
    """Under full recompute the backward adds each layer's weight gradient into the step's running
    sum in place (agx.training.accumulation), so four micro-batches compile to no more temporaries
    than one: JAX's own backward returned a micro-batch's whole gradient beside the sum, one more
    gradient-sized buffer (+40 MiB here with selective recompute, for a 49 MiB gradient). A model
    whose gradients dominate (8 layers of width 1024, 16 positions), FSDP over 8 devices."""
    from agx.config import load_experiment
    from agx.planning import analytic
    from agx.planning.compiled import compile_step

    def compiled_and_planned(microbatches: int):
        cfg = load_experiment("gpt3_tiny", [
            "model.num_layers=8", "model.d_model=1024", "model.num_heads=8", "model.seq_len=16",
            "model.vocab_size=1024", "train.batch_size=32", "mesh.data=1", "mesh.fsdp=8", "model.remat=full",
            f"train.microbatches={microbatches}"])
        shape = {"pipeline": 1, "data": 1, "fsdp": 8, "context": 1, "tensor": 1}
        grads = analytic.memory(cfg, analytic.StateShapes(cfg), shape, None)["grads"]
        return compile_step(cfg).memory["temporaries"], grads

    (one, grads), (four, grads_planned) = compiled_and_planned(1), compiled_and_planned(4)
    assert grads == grads_planned  # the planner too counts one buffer
    assert four <= one + 0.1 * grads, (one, four, grads)
