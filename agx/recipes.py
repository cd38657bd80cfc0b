"""Named experiments' recipes: GPT-3 Table 2.1 (Brown et al. 2020), the trillion-parameter GPT, and
the Llama-style AuroraGPT models, each as a whole Config (model shape, mesh, batch, schedule). The
experiment files in experiments/ build on these. Their parameter counts and FLOPs are
agx.models.sizes', checked by the tests against the published table.
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


@dataclass(frozen=True)
class LlamaSize:
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    ffn: int
    seq_len: int
    vocab: int
    rope_theta: float
    params: float  # counted by hand from the shapes (the figures)


# AuroraGPT (Argonne's Llama-style models, trained with Megatron-DeepSpeed on Aurora). The 7B's
# θ = 50000 is its recipe's; the others take Llama 2's and Megatron-DeepSpeed's default, 10000.
# Vocabularies: Gemma's 256000 for 2B, Llama 2's 32000 for 7B and 70B.
AURORAGPT = {
    "auroragpt_2b": LlamaSize(12, 2048, 16, 4, 11008, 8192, 256000, 10000.0, 1.99e9),
    "auroragpt_7b": LlamaSize(32, 4096, 32, 8, 11008, 4096, 32000, 50000.0, 5.93e9),
    "auroragpt_70b": LlamaSize(80, 8192, 64, 8, 28672, 8192, 32000, 10000.0, 68.98e9),
}


def llama_model(**shape) -> ModelConfig:
    """The Llama architecture on agx's one model: rotary positions, RMSNorm, SwiGLU, grouped-query
    attention, no biases, untied embeddings."""
    return ModelConfig(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, **shape)


def auroragpt_experiment(name: str, seq_len: int | None = None, context: int = 1) -> Config:
    """A size from AURORAGPT with Llama 2's recipe: 4M-token batches, lr 3e-4 (1.5e-4 for 70B),
    2000 warm-up steps, cosine to 10% over 2T tokens, bf16, ZeRO-3 over all devices, selective remat.
    seq_len: a longer context than the size's own (the experiment is then named for it in thousands),
    with each sequence split over `context` devices (agx.parallel.context)."""
    size = AURORAGPT[name]
    seq_len = seq_len or size.seq_len
    batch = 4 * 2**20 // seq_len
    steps = round(2e12 / (batch * seq_len))
    return Config(
        name=name if seq_len == size.seq_len else f"{name}_{seq_len // 1024}k",
        model=llama_model(num_layers=size.layers, d_model=size.d_model, num_heads=size.heads,
                          num_kv_heads=size.kv_heads, ffn_size=size.ffn, seq_len=seq_len,
                          vocab_size=size.vocab, rope_theta=size.rope_theta, dtype="bfloat16", remat="selective"),
        mesh=MeshConfig(data=1, fsdp=-1, context=context, tensor=1, zero_stage=3),
        train=TrainConfig(steps=steps, batch_size=batch),
        optim=OptimConfig(lr=1.5e-4 if size.d_model >= 8192 else 3e-4, warmup_steps=2000, decay_steps=steps),
    )
