"""Named model sizes: GPT-3 Table 2.1 (Brown et al. 2020) and the trillion-parameter GPT.

Parameter counts and FLOPs are computed here from the shapes, and checked by the tests against
the published table and against the abstract parameter tree of the Flax model.
"""

from __future__ import annotations

from dataclasses import dataclass

from agx.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class PublishedSize:
    layers: int
    d_model: int
    heads: int
    params: float  # as published
    batch_size: int  # sequences of 2048 tokens
    lr: float


# GPT-3 Table 2.1; the 1T row is Megatron-LM's (Narayanan et al. 2021, Table 1), used on Aurora.
# XL: the table's 24 heads of 128 do not tile d_model 2048 (and would not give 1.3B parameters);
# we keep its head size, 128, with 16 heads, as Megatron's and GPT-Neo's 1.3B configs do.
PUBLISHED = {
    "gpt3_small": PublishedSize(12, 768, 12, 125e6, 256, 6.0e-4),
    "gpt3_medium": PublishedSize(24, 1024, 16, 350e6, 256, 3.0e-4),
    "gpt3_large": PublishedSize(24, 1536, 16, 760e6, 256, 2.5e-4),
    "gpt3_xl": PublishedSize(24, 2048, 16, 1.3e9, 512, 2.0e-4),
    "gpt3_2_7b": PublishedSize(32, 2560, 32, 2.7e9, 512, 1.6e-4),
    "gpt3_6_7b": PublishedSize(32, 4096, 32, 6.7e9, 1024, 1.2e-4),
    "gpt3_13b": PublishedSize(40, 5120, 40, 13e9, 1024, 1.0e-4),
    "gpt3_175b": PublishedSize(96, 12288, 96, 175e9, 1536, 0.6e-4),
    "gpt3_1t": PublishedSize(128, 25600, 160, 1e12, 3072, 0.6e-4),
}


def gpt3_experiment(name: str) -> Config:
    """A published size with GPT-3's training recipe: 300B tokens, 375M warm-up tokens, cosine
    decay over 260B tokens to 10%, bf16 compute, ZeRO-3 over all devices, selective remat."""
    size = PUBLISHED[name]
    tokens_per_step = size.batch_size * 2048
    return Config(
        name=name,
        model=ModelConfig(num_layers=size.layers, d_model=size.d_model, num_heads=size.heads, seq_len=2048,
                          vocab_size=GPT2_VOCAB, dtype="bfloat16", remat="selective"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, zero_stage=3),
        train=TrainConfig(steps=round(300e9 / tokens_per_step), batch_size=size.batch_size),
        optim=OptimConfig(lr=size.lr, warmup_steps=round(375e6 / tokens_per_step),
                          decay_steps=round(260e9 / tokens_per_step)),
    )


def param_count(m: ModelConfig) -> int:
    """Parameters of the model as built (padded vocabulary, tied LM head)."""
    d = m.d_model
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * m.d_ff + m.d_ff) + (m.d_ff * d + d) + 2 * 2 * d
    return m.padded_vocab * d + m.seq_len * d + m.num_layers * per_layer + 2 * d


def flops_per_token(m: ModelConfig) -> int:
    """Model FLOPs per trained token (forward and backward), PaLM's 6N + 12·L·H·Q·T."""
    return 6 * param_count(m) + 12 * m.num_layers * m.num_heads * m.head_dim * m.seq_len
