"""Layouts for a system: one planned (analytic, then compiled), or searched over meshes, ZeRO stages,
remat policies and micro-batches, for a node count or for the fewest nodes that fit."""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
from pathlib import Path

from agx.config import Config
from agx.errors import UserError
from agx.models.sizes import param_count
from agx.planning.systems import System

ADAM_BYTES_PER_PARAM = 16  # fp32 weights, gradients and two moments: the floor for every layout
HEADROOM = 0.8  # compile only layouts whose analytic memory is within 80% of the device's
MAX_COMPILES = 8  # per node count, in rank order, until --top of them are confirmed to fit


def fewest_nodes_bound(cfg: Config, system: System) -> int:
    """No layout fits on fewer nodes: the state alone needs 16 bytes a parameter."""
    return max(1, math.ceil(ADAM_BYTES_PER_PARAM * param_count(cfg.model) / (system.memory_bytes * system.devices_per_node)))


def compile_equivalent(cfg: Config, shape: dict):
    """Compiles the layout on as many simulated devices; above the CPU backend's limit, the same layout
    with `data` (and the batch) divided, when that keeps every per-device shard the same (ZeRO-0)."""
    import jax

    from agx.planning.compiled import compile_step

    devices = math.prod(shape.values())
    if devices <= jax.device_count():
        return compile_step(_with_mesh(cfg, shape), jax.devices()[:devices])
    k = math.ceil(devices / jax.device_count())
    while k <= shape["data"] and shape["data"] % k:
        k += 1
    if cfg.mesh.zero_stage != 0 or k > shape["data"]:
        return None  # no smaller layout has the same shards: say so, never pretend
    small = _with_mesh(cfg, {**shape, "data": shape["data"] // k}, train__batch_size=cfg.train.batch_size // k)
    result = compile_step(small, jax.devices()[:devices // k])
    result.note += f"; equivalent to {devices}: data={shape['data'] // k} instead of {shape['data']}, same per-device shards"
    return result


def _with_mesh(cfg: Config, shape: dict, **changes) -> Config:
    """cfg with another mesh and `changes` ("section__field": value). The sections changed are copied,
    the others shared (nothing changes a result in place): copying every section, let alone a deep
    copy, took most of a search's time."""
    changed = {"mesh"} | {key.split("__")[0] for key in changes}
    out = dataclasses.replace(cfg, **{name: copy.copy(getattr(cfg, name)) for name in changed})
    for axis, size in shape.items():
        setattr(out.mesh, axis, size)
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(out, section), field, value)
    return out


def run_plan(cfg: Config, system: System, nodes: int, compile_: bool):
    from agx.parallel.mesh import AXES, mesh_shape
    from agx.planning.analytic import StateShapes
    from agx.planning.estimate import plan_layout

    available = nodes * system.devices_per_node
    sizes = {axis: getattr(cfg.mesh, axis) for axis in AXES}
    devices = math.prod(sizes.values()) if -1 not in sizes.values() else available  # a full mesh may leave devices idle
    if devices > available or devices % nodes:
        raise UserError(f"mesh {','.join(f'{a}={n}' for a, n in sizes.items())} does not spread evenly over "
                        f"{nodes} {system.name} node(s) of {system.devices_per_node} devices")
    shape = mesh_shape(cfg.mesh, devices)
    plan = plan_layout(cfg, StateShapes(cfg), shape, system, nodes)
    if compile_:
        plan.compiled = compile_equivalent(cfg, shape)
        if plan.compiled is None:
            print(f"agx: not compiled: {plan.devices} devices exceed the CPU backend's simulated devices, and "
                  "only ZeRO-0 layouts have a smaller equivalent; the analytic figures stand alone")
    return plan


def candidates(cfg: Config, devices: int, system: System):
    """Every layout of `devices` worth trying: tensor within a node and dividing the heads; pipeline
    stages dividing the layers, with 1-16 micro-batches per stage and 1 or 2 repeats. The layouts
    share their sections: one copy per distinct remat policy, micro-batch count, pipeline setting
    and mesh, not one per layout (a trillion's search sizes 200,000 of them)."""
    def section(name: str, **fields):
        key = (name, *sorted(fields.items()))
        if key not in variants:
            variants[key] = dataclasses.replace(getattr(cfg, name), **fields)
        return variants[key]

    variants = {}
    divisors = [n for n in range(1, devices + 1) if devices % n == 0]
    for p in [n for n in divisors if cfg.model.num_layers % n == 0]:
        for t in [n for n in divisors if n <= system.devices_per_node and cfg.model.num_heads % n == 0
                  and (devices // p) % n == 0]:
            for c, f in [(c, f) for c in _context_choices(cfg, devices // p // t) for f in divisors
                         if (devices // p // t // c) % f == 0]:
                d = devices // p // t // c // f
                per_replica = cfg.train.batch_size // (d * f) if cfg.train.batch_size % (d * f) == 0 else 0
                for zero in ((0, 1, 3) if d > 1 else (3,)):
                    mesh = section("mesh", pipeline=p, data=d, fsdp=f, context=c, tensor=t, zero_stage=zero,
                                   sequence_parallel=t > 1)
                    for remat in ("none", "selective", "full"):
                        for micro in [2**i for i in range(7) if per_replica and per_replica % 2**i == 0]:
                            for stages in _pipeline_choices(cfg, p, per_replica // micro):
                                yield dataclasses.replace(cfg, mesh=mesh, model=section("model", remat=remat),
                                                          train=section("train", microbatches=micro),
                                                          pipeline=section("pipeline", **stages))


LONG_SEQUENCE = 8192  # from here on the search splits sequences over `context` too


def _context_choices(cfg: Config, devices: int) -> list[int]:
    """1, and for a long sequence every split of `devices` that leaves each device 1024 positions or
    more in 2·context equal chunks (agx.parallel.context)."""
    s = cfg.model.seq_len
    return [1] + [c for c in range(2, devices + 1) if s >= LONG_SEQUENCE and devices % c == 0
                  and s % (2 * c) == 0 and s // c >= 1024]


def _pipeline_choices(cfg: Config, p: int, sequences: int):
    """The pipeline settings to try for p stages: (repeats, micro-batches) as fields."""
    if p == 1:
        yield {}
        return
    for repeats in (1, 2):
        for per_stage in (1, 2, 4, 8, 16):
            if cfg.model.num_layers % (p * repeats) == 0 and sequences % (p * per_stage) == 0:
                yield {"repeats": repeats, "microbatches": p * per_stage}


def plans_for(cfg: Config, shapes, system: System, nodes: int) -> list:
    """Every layout on `nodes` that the model and the batch allow, fitting ones first, each group
    fastest first. Weights are padded where fsdp or data do not divide them (agx.parallel.padding),
    so all of each node's devices can hold state: a factor the model lacks (3, on Aurora's 12
    tiles) goes to fsdp or data. The batch must still divide by data × fsdp, so the largest power
    of two of each node's devices is tried as well (AuroraGPT's 512 sequences divide no mesh of 12)."""
    from agx.parallel.mesh import AXES
    from agx.planning.estimate import plan_layout

    plans = []
    per_node = {system.devices_per_node, 2 ** int(math.log2(system.devices_per_node))}
    for used in sorted(per_node, reverse=True):
        for candidate in candidates(cfg, nodes * used, system):
            shape = {axis: getattr(candidate.mesh, axis) for axis in AXES}
            try:
                plans.append(plan_layout(candidate, shapes, shape, system, nodes))
            except UserError:  # the tensor or pipeline axis does not divide the model
                continue
    return sorted(plans, key=lambda p: (not p.fits, p.step_s if p.fits else p.memory["total"]))


def run_search(cfg: Config, system: System, nodes: int | None, top: int, output: Path | None, compile_: bool) -> str:
    from agx.planning.analytic import StateShapes

    shapes = StateShapes(cfg)
    bound = fewest_nodes_bound(cfg, system)
    counts = [nodes] if nodes else range(bound, 4 * bound + 1)
    curve, lines, chosen = [], [], None
    for n in counts:
        plans = plans_for(cfg, shapes, system, n)
        if plans:
            curve.append((n, min(p.memory["total"] for p in plans)))
        fitting = [p for p in plans if p.fits]
        if compile_:  # confirm in rank order; the analytic figure runs below XLA's, so keep headroom
            confirmed, tried = [], set()
            for p in [p for p in fitting if p.memory["total"] <= HEADROOM * system.memory_bytes]:
                if _state_twin(p) in tried:
                    continue  # the same shards as a layout compiled already
                if len(tried) == MAX_COMPILES:
                    break
                tried.add(_state_twin(p))
                p.compiled = compile_equivalent(p.cfg, p.mesh)
                p.fits = p.compiled is not None and p.compiled.memory["total"] <= system.memory_bytes
                if p.fits:
                    confirmed.append(p)
                if len(confirmed) == top:
                    break
            fitting = confirmed
        if fitting or nodes:
            chosen = (n, plans, fitting)
            break
    if chosen is None:
        raise UserError(f"no layout of {cfg.name} fits on up to {counts[-1]} {system.name} nodes")
    n, plans, fitting = chosen
    if not plans:
        raise UserError(f"no layout of {n} {system.name} node(s) divides {cfg.name} and its batch: "
                        f"train.batch_size={cfg.train.batch_size} must divide by data × fsdp")
    how = "confirmed by compiling" if compile_ else "by the analytic figure"
    lines.append(f"{cfg.name} on {system.name}: {len(plans)} layouts of {n} node(s) divide the model and the batch; "
                 f"{len(fitting)} shown fit, {how} (the 16-bytes-a-parameter floor is {bound} nodes)")
    header = ["nodes", "per_node", "pipeline", "data", "fsdp", "context", "tensor", "zero", "remat", "microbatches",
              "pipeline_microbatches", "repeats", "analytic_gib", "compiled_gib", "step_s", "mfu"]
    lines.append("  ".join(f"{h:>12}" for h in header))
    for p in (fitting or plans)[:top]:  # none fit: the least memory first
        row = p.row()
        lines.append("  ".join(f"{str(row[h]):>12}" for h in header))
    lines.append(_pipeline_verdict(plans))
    if output:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "search.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(plans[0].row()))
            writer.writeheader()
            writer.writerows(p.row() for p in plans)
        if nodes:  # the curve around the asked node count
            for m in sorted({max(1, nodes // 4), max(1, nodes // 2), 2 * nodes} - {nodes}):
                others = plans_for(cfg, shapes, system, m)
                if others:
                    curve.append((m, min(p.memory["total"] for p in others)))
        _plot(sorted(curve), system, cfg.name, output / "memory.png")
        lines.append(f"wrote {output / 'search.csv'} and {output / 'memory.png'}")
    return "\n".join(lines)


def _state_twin(plan) -> tuple:
    """What fixes a layout's per-device state and activations: under ZeRO-3, `data` and `fsdp`
    shard the same arrays, so only their product counts."""
    c, m = plan.cfg, plan.mesh
    split = m["data"] * m["fsdp"] if c.mesh.zero_stage == 3 else (m["data"], m["fsdp"])
    return (m["pipeline"], m["tensor"], m["context"], split, c.mesh.zero_stage, c.model.remat, c.train.microbatches,
            c.mesh.sequence_parallel, c.pipeline.microbatches if m["pipeline"] > 1 else 0,
            c.pipeline.repeats if m["pipeline"] > 1 else 0)


def _pipeline_verdict(plans) -> str:
    """Whether pipeline stages beat fsdp/tensor alone here: least memory, and fastest that fits."""
    sides = {}
    for staged in (False, True):
        group = [p for p in plans if (p.mesh["pipeline"] > 1) == staged]
        fitting = [p for p in group if p.fits]
        sides[staged] = (min((p.memory["total"] for p in group), default=None),
                         min(fitting, key=lambda p: p.step_s) if fitting else None)
    if sides[True][0] is None:
        return "pipeline: no layout with pipeline stages divides the model and the batch here"
    words = []
    for what, staged in (("with pipeline stages", True), ("without", False)):
        memory, fastest = sides[staged]
        best = (f"fastest fitting {fastest.step_s:.3g} s (pipeline={fastest.mesh['pipeline']}, "
                f"tensor={fastest.mesh['tensor']}, fsdp={fastest.mesh['fsdp']}, data={fastest.mesh['data']})"
                if fastest else "none fits")
        words.append(f"{what}: least memory {memory / 2**30:.1f} GiB, {best}")
    (staged_memory, staged_fast), (flat_memory, flat_fast) = sides[True], sides[False]
    faster = staged_fast is not None and (flat_fast is None or staged_fast.step_s < flat_fast.step_s)
    return (f"pipeline: {'; '.join(words)}. Pipeline layouts {'beat' if faster else 'do not beat'} fsdp/tensor "
            f"alone on estimated step time and {'beat' if staged_memory < flat_memory else 'do not beat'} them on memory")


def _plot(curve, system: System, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([n for n, _ in curve], [b / 2**30 for _, b in curve], "o-", label="least memory of any layout (analytic)")
    ax.axhline(system.memory_gib, color="red", linestyle="--", label=f"{system.memory_gib:g} GiB per device")
    ax.set_xlabel(f"{system.name} nodes")
    ax.set_ylabel("memory per device (GiB)")
    ax.set_title(f"{name} on {system.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
