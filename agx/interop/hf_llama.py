"""agx's Llama architecture (model.position=rope, norm=rmsnorm, mlp=swiglu) as Hugging Face
`LlamaForCausalLM`.

torch's Linear stores [out, in], so every matrix is agx's kernel with its head axes merged and
transposed. agx's fused weights split into Llama's separate ones: qkv (or kv) into q/k/v_proj, the
SwiGLU fc [D, 2, F] into gate_proj and up_proj. agx's rotary layout is already Llama's (the half-split
pairs of Hugging Face's rotate_half), so no rows are permuted.
"""

from __future__ import annotations

from pathlib import Path

from agx.config import ModelConfig
from agx.errors import UserError
from agx.interop.hf_architecture import Architecture, Piece


def unfit(m: ModelConfig) -> list[str]:
    return [need for need, ok in [
        ("model.position=rope", m.position == "rope"), ("model.norm=rmsnorm", m.norm == "rmsnorm"),
        ("model.mlp=swiglu", m.mlp == "swiglu")] if not ok]


def pieces(m: ModelConfig) -> dict[str, Piece]:
    matrix = dict(split=1, transpose=True)
    out = {"model.embed_tokens.weight": Piece("wte.embedding", split=1, vocab_axis=0)}
    for layer in range(m.num_layers):
        at = f"model.layers.{layer}."
        if m.kv_heads == m.num_heads:  # one fused [D, 3, H, Q]
            qkv = {name: ("qkv", (1, i)) for i, name in enumerate("qkv")}
        else:  # [D, H, Q] and a fused [D, 2, K, Q]
            qkv = {"q": ("q", None), "k": ("kv", (1, 0)), "v": ("kv", (1, 1))}
        for name, (agx, part) in qkv.items():
            out[f"{at}self_attn.{name}_proj.weight"] = Piece(f"layers.{agx}.kernel", layer, part, **matrix)
            if m.bias:
                bias_part = None if part is None else (0, part[1])
                out[f"{at}self_attn.{name}_proj.bias"] = Piece(f"layers.{agx}.bias", layer, bias_part)
        out[f"{at}self_attn.o_proj.weight"] = Piece("layers.proj.kernel", layer, split=2, transpose=True)
        for i, name in enumerate(("gate", "up")):
            out[f"{at}mlp.{name}_proj.weight"] = Piece("layers.fc.kernel", layer, (1, i), **matrix)
        out[f"{at}mlp.down_proj.weight"] = Piece("layers.out.kernel", layer, **matrix)
        if m.bias:
            out[f"{at}self_attn.o_proj.bias"] = Piece("layers.proj.bias", layer)
            out.update({f"{at}mlp.{name}_proj.bias": Piece("layers.fc.bias", layer, (0, i))
                        for i, name in enumerate(("gate", "up"))})
            out[f"{at}mlp.down_proj.bias"] = Piece("layers.out.bias", layer)
        out[f"{at}input_layernorm.weight"] = Piece("layers.ln_attn.scale", layer)
        out[f"{at}post_attention_layernorm.weight"] = Piece("layers.ln_mlp.scale", layer)
    out["model.norm.weight"] = Piece("ln_f.scale")
    if not m.tie_embeddings:
        out["lm_head.weight"] = Piece("lm_head.kernel", split=1, transpose=True, vocab_axis=1)
    return out


def hf_config(m: ModelConfig, dtype: str, eod: int | None) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "rope_scaling": None, "hidden_act": "silu", "attention_bias": m.bias, "mlp_bias": m.bias,
            "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
            "pretraining_tp": 1, "use_cache": True, "bos_token_id": eod, "eos_token_id": eod,
            "torch_dtype": dtype, "dtype": dtype}  # 4.x, 5.x names


def model_shape(config: dict, folder: Path) -> dict:
    """agx ModelConfig fields from a Llama config.json; options agx's model does not compute are
    refused rather than imported wrongly."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_scaling") or {}
    unsupported = [f"{key}={config.get(key)!r}" for key, ok in [
        ("hidden_act", config.get("hidden_act", "silu") == "silu"),
        ("rope_scaling", rope.get("rope_type", rope.get("type", "default")) == "default"),
        ("head_dim", config.get("head_dim") in (None, d // heads)),
        ("mlp_bias", config.get("mlp_bias", False) == config.get("attention_bias", False)),
        ("pretraining_tp", config.get("pretraining_tp", 1) == 1)] if not ok]
    if unsupported:
        raise UserError(f"{folder}: Llama options agx's model does not compute: {', '.join(unsupported)}")
    kv_heads = config.get("num_key_value_heads") or heads
    return {"num_layers": config["num_hidden_layers"], "d_model": d, "num_heads": heads,
            "num_kv_heads": None if kv_heads == heads else kv_heads, "ffn_size": config["intermediate_size"],
            "seq_len": config["max_position_embeddings"], "vocab_size": config["vocab_size"],
            "position": "rope", "rope_theta": float(config.get("rope_theta", 10000.0)), "norm": "rmsnorm",
            "norm_eps": config.get("rms_norm_eps", 1e-6), "mlp": "swiglu",
            "bias": bool(config.get("attention_bias", False)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False))}


ARCHITECTURE = Architecture("llama", "", unfit, pieces, hf_config, model_shape)
