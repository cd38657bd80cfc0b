"""A 4-layer Llama-style model (the AuroraGPT architecture) that trains in minutes on a CPU, on the
standard library's source. 8 query heads share 2 KV heads; heads, widths, vocabulary and batch are
divisible by 8, so every layout of 8 devices applies (tensor > 2 keeps the KV heads whole)."""

from agx.config import CheckpointConfig, Config, EvalConfig, MeshConfig, OptimConfig, TrainConfig
from agx.recipes import llama_model


def config() -> Config:
    return Config(
        name="llama_tiny",
        model=llama_model(num_layers=4, d_model=128, num_heads=8, num_kv_heads=2, ffn_size=352, seq_len=128,
                          vocab_size=2048, scan_unroll=4),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1, zero_stage=1),
        train=TrainConfig(steps=300, batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, decay_steps=300),
        checkpoint=CheckpointConfig(every=50, keep=3),
        eval=EvalConfig(every=50, batches=4),
    )
