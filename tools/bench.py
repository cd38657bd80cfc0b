"""Times full training steps of an experiment after warm-up; prints one JSON line.

    python tools/bench.py [--experiment bench_cpu] [--set key=value ...] [--steps 10] [--warmup 3]
                          [--peer ../shared/peers/torch_gpt_step.py --rounds 5]

MFU is model FLOPs per second (PaLM's 6N + 12·L·H·Q·T per token) over the trainer's peak
(agx.training.metrics): on CPU the XLA matmul throughput measured in the same run, on GPUs the
vendor's dense peak for the compute dtype. With
--peer, agx and the PyTorch peer run interleaved, `--rounds` times each, and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agx.config import load_experiment  # noqa: E402
from agx.errors import UserError  # noqa: E402
from agx.runtime import choose_platform  # noqa: E402

def time_agx_steps(trainer, state, batch, steps: int):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.step_fn(state, batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    return state, statistics.median(times)


def run_peer(peer: str, cfg, steps: int) -> float:
    """Runs the PyTorch peer (torch.compile) on the same shape; returns its tokens/s."""
    m, t = cfg.model, cfg.train
    cmd = [sys.executable, peer, "--layers", str(m.num_layers), "--d-model", str(m.d_model), "--heads",
           str(m.num_heads), "--seq", str(m.seq_len), "--vocab", str(m.padded_vocab), "--batch", str(t.batch_size),
           "--steps", str(steps), "--compile"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"tokens_per_s=([\d.]+)", out).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="bench_cpu")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peer", help="path to the PyTorch peer script, run interleaved with agx")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of agx (and the peer)")
    args = parser.parse_args(argv)
    choose_platform()
    try:
        cfg = load_experiment(args.experiment, args.set)
        import jax

        from agx.data.dataset import make_loader
        from agx.models.sizes import flops_per_token
        from agx.training.loop import Trainer
        from agx.training.metrics import peak_tflops_per_device
        from agx.parallel.batch import batch_sharding

        trainer = Trainer.build(cfg)
        state = trainer.init()
        batch = next(make_loader(cfg, batch_sharding(trainer.mesh), num_batches=1))
        state, _ = time_agx_steps(trainer, state, batch, args.warmup)
        agx_step_s, peer_tokens_per_s = [], []
        for _ in range(args.rounds):
            state, step_s = time_agx_steps(trainer, state, batch, args.steps)
            agx_step_s.append(step_s)
            if args.peer:
                peer_tokens_per_s.append(run_peer(args.peer, cfg, args.steps))
        peak, peak_source = peak_tflops_per_device(jax.devices()[0], cfg.model.dtype, cfg.train.peak_tflops_per_device)
    except UserError as e:
        print(f"agx: error: {e}", file=sys.stderr)
        return 2
    step_s = statistics.median(agx_step_s)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    devices = trainer.mesh.devices.size
    tflops_per_device = flops_per_token(cfg.model) * tokens / step_s / devices / 1e12
    result = {"experiment": cfg.name, "device": jax.devices()[0].device_kind, "devices": devices,
              "tokens_per_s": tokens / step_s, "step_s": step_s, "model_tflops_per_s": tflops_per_device,
              "peak_tflops_per_s": peak, "peak": peak_source, "mfu": tflops_per_device / peak,
              "rounds": args.rounds, "steps_per_round": args.steps}
    if args.peer:
        peer = statistics.median(peer_tokens_per_s)
        result.update(peer_tokens_per_s=peer, agx_over_peer=result["tokens_per_s"] / peer)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
