"""The "every byte" scoreboard: for each canonical layout, the bytes per device that the compiled
training step moves, by collective kind, next to the analytic minimum of that kind.

    python -m agx.planning.canonical        # prints the README's table (8 simulated CPU devices)

The layouts are a 2-layer model of width 256 at 128 positions and batch 32, in fp32, its layers in a
loop, on 8 simulated CPU devices. The minimum is agx.planning.analytic's, by purpose, put under the
kind of collective that moves it. The CPU backend forms no reduce-scatter of its own: where a
gradient reduction is left to XLA it shows as an all-reduce, twice the bytes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from agx.config import Config
from agx.planning.analytic import minimum_by_kind
from agx.planning.compiled import KINDS

SMALL = ["model.num_layers=2", "model.d_model=256", "model.num_heads=8", "model.seq_len=128", "model.vocab_size=1024",
         "train.batch_size=32", "model.dtype=float32", "model.scan_unroll=1"]
LAYOUTS = {
    "data=8, ZeRO-1, 4 micro-batches": ("gpt3_tiny", ["mesh.data=8", "mesh.zero_stage=1", "train.microbatches=4"]),
    "fsdp=8, 4 micro-batches": ("gpt3_tiny", ["mesh.data=1", "mesh.fsdp=8", "train.microbatches=4"]),
    "tensor=8, sequence parallel": ("gpt3_tiny", ["mesh.data=1", "mesh.tensor=8", "mesh.sequence_parallel=true"]),
    "pipeline=4 × data=2, GPipe, 8 micro-batches": (
        "gpt3_tiny", ["model.num_layers=4", "mesh.pipeline=4", "mesh.data=2", "pipeline.microbatches=8"]),
    "pipeline=4 × data=2, 1F1B, 8 micro-batches": (
        "gpt3_tiny", ["model.num_layers=4", "mesh.pipeline=4", "mesh.data=2", "pipeline.microbatches=8",
                      "pipeline.schedule=1f1b"]),
    "Llama GQA (8 heads, 2 KV), tensor=2 × data=4": ("llama_tiny", ["mesh.data=4", "mesh.tensor=2"]),
    "Llama GQA (8 heads, 2 KV), tensor=8": ("llama_tiny", ["mesh.data=1", "mesh.tensor=8"]),
    "data=2 × fsdp=2 × tensor=2, ZeRO-3, 4 micro-batches": (
        "gpt3_tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.zero_stage=3", "train.microbatches=4"]),
    "Llama GQA (8 heads, 2 KV), context=4 × data=2": ("llama_tiny", ["mesh.data=2", "mesh.context=4"]),
}
@dataclass
class Measured:
    cfg: Config
    shapes: object  # agx.planning.analytic.StateShapes
    minimum: dict  # bytes per device by purpose (agx.planning.analytic.collective_bytes)
    compiled: dict  # by kind: count, bytes and in_loops (agx.planning.compiled.collectives_in)

    def row(self, name: str) -> list[str]:
        """The layout's name, then compiled and minimum MiB per kind, and the total ratio."""
        compiled = {kind: self.compiled.get(kind, {"bytes": 0})["bytes"] for kind in KINDS}
        minimum = minimum_by_kind(self.minimum)
        cells = [f"{compiled[k] / 2**20:.2f} / {minimum[k] / 2**20:.2f}" for k in KINDS]
        return [name, *cells, f"{sum(compiled.values()) / sum(minimum.values()):.2f}×"]


def measure(experiment: str, settings: list[str]) -> Measured:
    """The layout (SMALL, then `settings`) compiled on the devices JAX has, beside its minimum."""
    from agx.config import load_experiment
    from agx.parallel.mesh import AXES
    from agx.planning import analytic
    from agx.planning.compiled import compile_step
    from agx.training.step import pipeline_schedule

    cfg = load_experiment(experiment, SMALL + settings)
    shape = {axis: getattr(cfg.mesh, axis) for axis in AXES}
    shapes = analytic.StateShapes(cfg)
    minimum = analytic.collective_bytes(cfg, shapes, shape, pipeline_schedule(cfg, shape))
    return Measured(cfg, shapes, minimum, compile_step(cfg).collectives)


def markdown(rows: list[list[str]]) -> str:
    header = ["layout", *(f"{k} MiB" for k in KINDS), "compiled / minimum"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.exit(print(markdown([measure(*layout).row(name) for name, layout in LAYOUTS.items()])))
