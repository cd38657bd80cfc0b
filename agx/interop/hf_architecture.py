"""What an agx model is called on the Hugging Face side: each architecture (agx.interop.hf_gpt2,
agx.interop.hf_llama) is an `Architecture`, a table of `Piece`s that agx.interop.hf_folder streams
through on export and import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agx.config import ModelConfig


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor as a piece of an agx parameter."""

    agx: str  # 'layers.qkv.kernel', 'wte.embedding', ...
    layer: int | None = None  # which layer of the stacked [L, ...] weight
    part: tuple[int, int] | None = None  # (axis, index) of a fused axis, in the layer's coordinates
    split: int | None = None  # leading axes that form the input dimension; None: flattened to 1-D
    transpose: bool = False  # stored [out, in] (torch's Linear) rather than [in, out] (agx, GPT-2's Conv1D)
    vocab_axis: int | None = None  # the padded vocabulary's axis, cut to the real vocabulary


@dataclass(frozen=True)
class Architecture:
    """What an agx model is called on the Hugging Face side."""

    model_type: str
    prefix: str  # stored before every name by *ForCausalLM.save_pretrained, optional on import
    unfit: Callable[[ModelConfig], list[str]]  # the agx options this architecture cannot express
    pieces: Callable[[ModelConfig], dict[str, Piece]]  # HF name (without prefix) -> Piece, in file order
    config: Callable[[ModelConfig, str, int | None], dict]  # config.json
    model_shape: Callable[[dict, Path], dict]  # config.json -> ModelConfig fields; refuses what agx cannot compute
