"""model.attention=auto: what it takes for each backend and model (cuDNN's fused attention on NVIDIA
GPUs where it applies, agx's blocked attention elsewhere), and a run with it is the run with that
choice made explicit."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import run_steps, tiny_config

from agx.config import ModelConfig
from agx.errors import UserError
from agx.models.attention_choice import choose_attention
from agx.training.loop import Trainer

GPU_SHAPE = ModelConfig(seq_len=2048, d_model=1024, num_heads=16, dtype="bfloat16")  # head size 64

# (model changes, backend, compute capability) -> (attention, block, words of the reason)
CASES = [
    ({"dtype": "float32", "seq_len": 256}, "cpu", None, "xla", 64, "cpu is not an NVIDIA GPU"),
    ({}, "cpu", None, "xla", 64, "cpu is not an NVIDIA GPU"),
    ({"seq_len": 96}, "cpu", None, "xla", 48, "cpu is not"),  # the largest divisor in [32, 64]
    ({"seq_len": 32}, "cpu", None, "xla", 0, "no block of 32-64 positions divides 32"),
    ({}, "cuda", "9.0", "cudnn", 0, "auto on cuda: bfloat16, head size 64"),
    ({"dtype": "float16"}, "cuda", "8.0", "cudnn", 0, "float16"),
    ({"dtype": "float32"}, "cuda", "9.0", "xla", 512, "model.dtype=float32"),
    ({"dropout": 0.1}, "cuda", "9.0", "xla", 512, "model.dropout=0.1"),
    ({"d_model": 2560}, "cuda", "8.0", "xla", 512, "head size 160 (cuDNN's needs a multiple of 8, at most 128"),
    ({"d_model": 2560}, "cuda", "9.0", "cudnn", 0, "head size 160"),  # Hopper takes up to 256
    ({"d_model": 192}, "cuda", "9.0", "xla", 512, "head size 12"),
    ({}, "rocm", None, "xla", 512, "rocm is not an NVIDIA GPU"),
    ({}, "xpu", None, "xla", 512, "xpu is not an NVIDIA GPU"),
    ({"attention_block": 256}, "cuda", "9.0", "xla", 256, "model.attention_block=256 asks for agx's"),
    ({"attention": "xla"}, "cuda", "9.0", "xla", 0, "model.attention=xla"),
    ({"attention": "cudnn"}, "cuda", "9.0", "cudnn", 0, "model.attention=cudnn"),
]


@pytest.mark.parametrize("changes,backend,capability,attention,block,why", CASES)
def test_auto_takes_cudnn_where_it_applies_and_the_backends_block_elsewhere(changes, backend, capability,
                                                                             attention, block, why):
    choice = choose_attention(dataclasses.replace(GPU_SHAPE, **changes), backend, capability)
    assert (choice.attention, choice.block) == (attention, block)
    assert why in choice.why


@pytest.mark.parametrize("changes,backend,message", [
    ({}, "cpu", "model.attention=cudnn needs an NVIDIA GPU; this run is on cpu"),
    ({}, "xpu", "model.attention=cudnn needs an NVIDIA GPU; this run is on xpu"),
    ({"d_model": 2560}, "cuda", "model.attention=cudnn cannot run this model: head size 160 (cuDNN's needs a "
                                "multiple of 8, at most 128 on this GPU)"),
])
def test_an_explicit_cudnn_that_cannot_run_is_refused_in_one_line(changes, backend, message):
    with pytest.raises(UserError) as refused:
        choose_attention(dataclasses.replace(GPU_SHAPE, attention="cudnn", **changes), backend, "8.0")
    assert str(refused.value) == message


def test_training_with_auto_on_a_cpu_is_training_with_its_block_made_explicit():
    """At 128 positions auto takes blocks of 64 here: fewer compiled FLOPs than the dense product's,
    and the losses and weights of model.attention=xla with model.attention_block=64."""
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (32, 129), 0, 2048))
    devices = jax.devices()[:2]

    def config(**model):
        cfg = tiny_config(data=2)
        cfg.model = dataclasses.replace(cfg.model, seq_len=128, **model)
        return cfg

    flops = {}
    for name, cfg in [("auto", config()), ("dense", config(attention="xla"))]:
        trainer = Trainer.build(cfg, devices)
        cost = trainer.compile().cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        chosen = trainer.cfg.model
        assert (chosen.attention, chosen.attention_block) == ("xla", 64 if name == "auto" else 0)
    assert flops["auto"] < flops["dense"], flops  # the masked blocks' attention FLOPs are skipped
    (auto_losses, auto_params), (explicit_losses, explicit_params) = (
        run_steps(cfg, tokens, devices, steps=2) for cfg in (config(), config(attention="xla", attention_block=64)))
    np.testing.assert_array_equal(auto_losses, explicit_losses)
    jax.tree_util.tree_map(np.testing.assert_array_equal, auto_params, explicit_params)
