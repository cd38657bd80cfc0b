"""One layout, planned: memory both ways, collective traffic, whether it fits, and a step-time
estimate from the system's peak and bandwidths.

The estimate: compute at the system's peak (plus the recomputed forward under remat, and the
pipeline's bubble), tensor- and sequence-parallel traffic (at intra-node bandwidth) and pipeline sends on the
critical path, and the data-parallel traffic (weight gathers, gradient reduction) overlapped with
compute; pipeline and data-parallel traffic at inter-node bandwidth once the job spans nodes. It
is a ranking aid, not a prediction: real MFU is lower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agx.config import Config
from agx.models.sizes import flops_per_token
from agx.parallel.context import check_divides
from agx.planning import analytic
from agx.planning.systems import System
from agx.training.step import pipeline_schedule

RECOMPUTE = {"none": 1.0, "selective": 1.03, "full": 4 / 3}  # extra forward work, as a factor on 6N


@dataclass
class Plan:
    cfg: Config
    mesh: dict
    devices: int
    nodes: int
    memory: dict  # analytic, bytes per device
    collectives: dict  # analytic minimum, bytes per device per step
    step_s: float
    mfu: float
    fits: bool
    compiled: object = None  # agx.planning.compiled.CompiledStep once compiled

    def row(self) -> dict:
        c = self.cfg
        row = {"nodes": self.nodes, "devices": self.devices, "per_node": self.devices // self.nodes, **{k: v for k, v in self.mesh.items()},
               "zero": c.mesh.zero_stage, "remat": c.model.remat, "microbatches": c.train.microbatches,
               "pipeline_microbatches": c.pipeline.microbatches if self.mesh["pipeline"] > 1 else "",
               "repeats": c.pipeline.repeats if self.mesh["pipeline"] > 1 else "",
               "sequence_parallel": c.mesh.sequence_parallel,
               "analytic_gib": round(self.memory["total"] / 2**30, 2),
               "compiled_gib": round(self.compiled.memory["total"] / 2**30, 2) if self.compiled else "",
               "step_s": round(self.step_s, 3), "mfu": round(self.mfu, 3), "fits": self.fits}
        return row


def plan_layout(cfg: Config, shapes: analytic.StateShapes, shape: dict, system: System,
                nodes: int | None = None) -> Plan:
    """`nodes`: when the mesh leaves some of their devices idle. Raises UserError when the layout does
    not divide the model."""
    devices = math.prod(shape.values())
    context = shape.get("context", 1)  # a shape written before the axis existed has none
    check_divides(cfg.model.seq_len, context)
    schedule = pipeline_schedule(cfg, shape)
    memory = analytic.memory(cfg, shapes, shape, schedule)
    collectives = analytic.collective_bytes(cfg, shapes, shape, schedule)
    flops = flops_per_token(cfg.model) * cfg.train.batch_size * cfg.model.seq_len
    work = RECOMPUTE[cfg.model.remat]
    if schedule:  # the stage is run once more from its saved input; bubbles idle every stage
        work = (work + 1 / 3) / (1 - schedule.bubble_fraction)
    compute_s = flops * work / (devices * system.peak_tflops * 1e12)
    nodes = nodes or max(1, -(-devices // system.devices_per_node))
    tp_link = system.intra_node_gbs if shape["tensor"] <= system.devices_per_node else system.inter_node_gbs
    dp_link = system.inter_node_gbs if nodes > 1 else system.intra_node_gbs
    context_link = system.intra_node_gbs if shape["tensor"] * context <= system.devices_per_node \
        else system.inter_node_gbs
    links = {"tensor-parallel all-reduce": tp_link, "sequence-parallel all-gather": tp_link,
             "sequence-parallel reduce-scatter": tp_link, "pipeline send/receive": dp_link,
             "context K/V all-gather": context_link, "context K/V-gradient reduce-scatter": context_link}
    critical_s = sum(collectives.get(purpose, 0) / (link * 1e9) for purpose, link in links.items())
    dp_s = sum(v for k, v in collectives.items() if k not in links) / (dp_link * 1e9)
    step_s = compute_s + critical_s + max(0.0, dp_s - compute_s)
    mfu = flops / (devices * system.peak_tflops * 1e12 * step_s)
    return Plan(cfg, shape, devices, nodes, memory, collectives, step_s, mfu, memory["total"] <= system.memory_bytes)
