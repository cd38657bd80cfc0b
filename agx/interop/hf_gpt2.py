"""agx's GPT-3 architecture as Hugging Face GPT-2 (`GPT2LMHeadModel`).

GPT-2's Conv1D stores weights as [in, out], which is agx's kernel layout with the head axes merged,
so every tensor is agx's bytes reshaped: no transposes. The stacked [L, ...] weights become one
tensor per layer, and the embedding loses its vocabulary padding rows.
"""

from __future__ import annotations

from pathlib import Path

from agx.config import ModelConfig
from agx.errors import UserError
from agx.interop.hf_architecture import Architecture, Piece

# agx name -> (GPT-2 name, how many leading agx axes form GPT-2's first axis; None: flattened to 1-D)
TOP = {"wte.embedding": ("wte.weight", 1), "wpe": ("wpe.weight", 1),
       "ln_f.scale": ("ln_f.weight", None), "ln_f.bias": ("ln_f.bias", None)}
PER_LAYER = {"ln_attn.scale": ("ln_1.weight", None), "ln_attn.bias": ("ln_1.bias", None),
             "qkv.kernel": ("attn.c_attn.weight", 1), "qkv.bias": ("attn.c_attn.bias", None),
             "proj.kernel": ("attn.c_proj.weight", 2), "proj.bias": ("attn.c_proj.bias", None),
             "ln_mlp.scale": ("ln_2.weight", None), "ln_mlp.bias": ("ln_2.bias", None),
             "fc.kernel": ("mlp.c_fc.weight", 1), "fc.bias": ("mlp.c_fc.bias", None),
             "out.kernel": ("mlp.c_proj.weight", 1), "out.bias": ("mlp.c_proj.bias", None)}


def unfit(m: ModelConfig) -> list[str]:
    return [need for need, ok in [
        ("model.position=learned", m.position == "learned"), ("model.norm=layernorm", m.norm == "layernorm"),
        ("model.mlp=gelu", m.mlp == "gelu"), ("as many KV heads as heads", m.kv_heads == m.num_heads),
        ("model.bias=true", m.bias), ("model.tie_embeddings=true", m.tie_embeddings)] if not ok]


def pieces(m: ModelConfig) -> dict[str, Piece]:
    out = {hf: Piece(agx, split=split, vocab_axis=0 if agx == "wte.embedding" else None)
           for agx, (hf, split) in TOP.items()}
    for layer in range(m.num_layers):
        out.update({f"h.{layer}.{hf}": Piece(f"layers.{agx}", layer, split=split)
                    for agx, (hf, split) in PER_LAYER.items()})
    return out


def hf_config(m: ModelConfig, dtype: str, eod: int | None) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.seq_len, "n_ctx": m.seq_len, "n_embd": m.d_model, "n_layer": m.num_layers,
            "n_head": m.num_heads, "n_inner": m.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": m.init_std, "scale_attn_weights": True, "tie_word_embeddings": True,
            "use_cache": True, "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": dtype,
            "dtype": dtype}  # 4.x, 5.x names


def model_shape(config: dict, folder: Path) -> dict:
    """agx ModelConfig fields from a GPT-2 config.json; GPT-2 options agx's model does not compute
    are refused rather than imported wrongly."""
    d = config["n_embd"]
    unsupported = [f"{key}={config.get(key)!r}" for key, ok in [
        ("activation_function", config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
        ("scale_attn_weights", config.get("scale_attn_weights", True)),
        ("scale_attn_by_inverse_layer_idx", not config.get("scale_attn_by_inverse_layer_idx", False)),
        ("tie_word_embeddings", config.get("tie_word_embeddings", True))] if not ok]
    if unsupported:
        raise UserError(f"{folder}: GPT-2 options agx's model does not compute: {', '.join(unsupported)}")
    inner = config.get("n_inner")
    return {"num_layers": config["n_layer"], "d_model": d, "num_heads": config["n_head"],
            "seq_len": config["n_positions"], "vocab_size": config["vocab_size"],
            "ffn_size": None if inner in (None, 4 * d) else inner,
            "norm_eps": config.get("layer_norm_epsilon", 1e-5)}


ARCHITECTURE = Architecture("gpt2", "transformer.", unfit, pieces, hf_config, model_shape)
