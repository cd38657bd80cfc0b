"""`model.attention=auto`: which causal attention a training run takes on the backend it runs on.

cuDNN's fused flash attention on NVIDIA GPUs wherever it applies (1.7-2.7x agx's own per step on an
H200: the README's GPU table); elsewhere agx's attention in query blocks that skip the masked half,
sized per backend. The model only ever sees the choice (`xla` or `cudnn`, and a block), made here
once per run from the device the mesh is built on, so that the log, `--dry-run` and the planner
name the same one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from agx.config import ModelConfig
from agx.errors import UserError

# agx's query block per backend, measured by tools/bench.py: on this project's 2-core CPU blocks of 64
# gained 11% over dense at seq 128 (gpt3_tiny) and 3.9% at seq 256 (bench_cpu); on an H200 blocks of
# 512 gained 14-24% (gpt3_small, gpt3_xl). Intel's GPUs take the GPU figure, unmeasured there.
BLOCKS = {"cpu": 64, "cuda": 512, "rocm": 512, "xpu": 512}
GPU_BLOCK = 512


@dataclass(frozen=True)
class AttentionChoice:
    attention: str  # "xla" or "cudnn", what the model runs
    block: int  # agx's query block; 0: one dense masked product (and always 0 with cudnn)
    why: str  # the reason, for the log
    context: int = 1  # the devices each sequence is split over (agx.parallel.context)

    def describe(self, seq_len: int) -> str:
        if self.attention == "cudnn":
            kind = "cuDNN's fused attention"
        elif self.context > 1:
            chunk = seq_len // (2 * self.context)
            blocks = f" (the diagonal ones in query blocks of {self.block})" if self.block else ""
            kind = (f"agx's attention over {seq_len} positions split over {self.context} devices, in load-balanced "
                    f"chunks of {chunk}{blocks}")
        elif self.block:
            kind = f"agx's attention in query blocks of {self.block} of {seq_len} positions"
        else:
            kind = f"agx's dense masked attention over {seq_len} positions"
        return f"{kind} ({self.why})"

    def applied(self, m: ModelConfig) -> ModelConfig:
        return dataclasses.replace(m, attention=self.attention, attention_block=self.block)


def device_backend(device) -> str:
    """'cuda', 'rocm', 'xpu', 'cpu', ...: JAX calls both GPU makers' devices 'gpu'; cuDNN is NVIDIA's."""
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def for_device(m: ModelConfig, device, context: int = 1) -> AttentionChoice:
    """choose_attention for the device a mesh starts with (all of a mesh's devices are alike)."""
    return choose_attention(m, device_backend(device), getattr(device, "compute_capability", None), context)


def cudnn_refusal(m: ModelConfig, backend: str, compute_capability: str | None = None,
                  context: int = 1) -> str | None:
    """Why cuDNN's fused attention (as jax.nn.dot_product_attention checks it) cannot run this model
    here, or None. compute_capability: the NVIDIA GPU's ("9.0"); None assumes one before Hopper.

    Its partitioning rules split the batch and the heads only. That is all that agx's layouts split
    inside the attention (data, fsdp, tensor with or without sequence parallelism, pipeline stages,
    whose vmap it batches at axis 0) but one: `context` splits the sequence, whose load-balanced
    chunk pairs (agx.parallel.context) cuDNN's kernel does not take."""
    if backend != "cuda":
        return f"{backend} is not an NVIDIA GPU"
    if context > 1:
        return f"mesh.context={context} (cuDNN's attention needs each device's whole sequence)"
    if m.dtype == "float32":
        return "model.dtype=float32 (cuDNN's attention is 16-bit)"
    if m.dropout:
        return f"model.dropout={m.dropout} (cuDNN's attention takes no dropout mask from agx)"
    hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
    most = 256 if hopper else 128
    if m.head_dim % 8 or m.head_dim > most:
        return f"head size {m.head_dim} (cuDNN's needs a multiple of 8, at most {most} on this GPU)"
    return None


def query_block(seq_len: int, backend: str) -> int:
    """The backend's block where it splits seq_len into at least two blocks of between half and all of
    it (the largest such divisor); 0 (dense) where none does."""
    best = BLOCKS.get(backend, GPU_BLOCK)
    fits = [c for c in range(best, best // 2 - 1, -1) if c < seq_len and seq_len % c == 0]
    return fits[0] if fits else 0


def choose_attention(m: ModelConfig, backend: str, compute_capability: str | None = None,
                     context: int = 1) -> AttentionChoice:
    """What `m.attention` runs as on `backend` ('cpu', 'cuda', 'rocm', 'xpu') with each sequence split
    `context` ways. Explicit choices stay, or, for cuDNN's where it cannot run, are refused in one line."""
    refusal = cudnn_refusal(m, backend, compute_capability, context)
    if m.attention == "cudnn" and backend != "cuda":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU; this run is on {backend}")
    if m.attention == "cudnn" and refusal:
        raise UserError(f"model.attention=cudnn cannot run this model: {refusal}")
    if m.attention != "auto":
        return AttentionChoice(m.attention, m.attention_block, f"model.attention={m.attention}", context)
    if m.attention_block:
        return AttentionChoice("xla", m.attention_block, f"auto: model.attention_block={m.attention_block} asks "
                                                         "for agx's blocked attention", context)
    if refusal is None:
        return AttentionChoice("cudnn", 0, f"auto on {backend}: {m.dtype}, head size {m.head_dim}")
    length = m.seq_len // (2 * context) if context > 1 else m.seq_len  # a diagonal chunk's, under context
    block = query_block(length, backend)
    best = BLOCKS.get(backend, GPU_BLOCK)
    unblocked = "" if block else f"; no block of {best // 2}-{best} positions divides {length} into two or more"
    return AttentionChoice("xla", block, f"auto on {backend}: not cuDNN's, for {refusal}{unblocked}", context)
