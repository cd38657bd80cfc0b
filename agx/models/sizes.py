"""Parameter counts and model FLOPs, computed from a ModelConfig's shapes, and checked by the tests
against the published tables and against the abstract parameter tree of the Flax model."""

from __future__ import annotations

from agx.config import ModelConfig


def param_count(m: ModelConfig) -> int:
    """Parameters of the model as built (padded vocabulary), counted from the shapes."""
    d, q, f = m.d_model, m.num_heads * m.head_dim, m.d_ff
    kv = 2 * m.kv_heads * m.head_dim
    b = int(m.bias)
    gates = 2 if m.mlp == "swiglu" else 1
    attention = d * (q + kv) + b * (q + kv) + q * d + b * d
    mlp = d * gates * f + b * gates * f + f * d + b * d
    norm = d * (2 if m.norm == "layernorm" and m.bias else 1)
    embeddings = m.padded_vocab * d * (1 if m.tie_embeddings else 2) + (m.seq_len * d if m.position == "learned" else 0)
    return embeddings + m.num_layers * (attention + mlp + 2 * norm) + norm


def flops_per_token(m: ModelConfig) -> int:
    """Model FLOPs per trained token (forward and backward).

    GPT-3's architecture: PaLM's 6N + 12·L·H·Q·T, as the GPT-3 and PaLM papers count. Otherwise
    Megatron-DeepSpeed's num_floating_point_operations, which counts the gated MLP's three matrices,
    the grouped KV projection and the LM head, but not the embedding lookup: with an untied head 6N
    would count the vocabulary twice (25% too many for AuroraGPT-2B's 256k vocabulary)."""
    if m.tie_embeddings and m.position == "learned":
        return 6 * param_count(m) + 12 * m.num_layers * m.num_heads * m.head_dim * m.seq_len
    return megatron_flops_per_token(m)


def megatron_flops_per_token(m: ModelConfig) -> int:
    """Megatron-DeepSpeed's num_floating_point_operations(args, batch) / (batch · seq_length):
    12·L·h²·(1 + (3/2 if SwiGLU)·F/h + K/H + T/h) + 6·h·V."""
    h, L, gated = m.d_model, m.num_layers, 1.5 if m.mlp == "swiglu" else 1
    per_layer = 12 * h * h * (1 + gated * m.d_ff / h + m.kv_heads / m.num_heads + m.seq_len / h)
    return round(L * per_layer + 6 * h * m.padded_vocab)
