"""The default: a 4-layer GPT-3 that trains in minutes on a CPU, on the standard library's source.
Heads, widths, vocabulary and batch are divisible by 8, so every layout of 8 devices applies."""

from agx.config import CheckpointConfig, Config, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="gpt3_tiny",
        model=ModelConfig(num_layers=4, d_model=128, num_heads=8, seq_len=128, vocab_size=2048,
                          scan_unroll=4),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1, zero_stage=1),
        train=TrainConfig(steps=300, batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, decay_steps=300),
        checkpoint=CheckpointConfig(every=50, keep=3),
        eval=EvalConfig(every=50, batches=4),
    )
