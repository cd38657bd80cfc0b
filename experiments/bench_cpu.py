"""The CPU benchmark shape, the same as shared/peers/torch_gpt_step.py: 4 layers, d_model 256,
4 heads, seq 256, vocab 8192, global batch 16, fp32, no dropout, no remat. Causal attention in
blocks of 64 positions, as the peer's fused causal attention also skips the masked blocks."""

from agx.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="bench_cpu",
        model=ModelConfig(num_layers=4, d_model=256, num_heads=4, seq_len=256, vocab_size=8192,
                          scan_unroll=4, attention_block=64),
        mesh=MeshConfig(data=-1),
        train=TrainConfig(steps=20, batch_size=16),
        optim=OptimConfig(lr=3e-4, warmup_steps=0),
    )
