"""`python -m agx.plan --experiment NAME [--system aurora|polaris|h100x8|cpu|FILE.json] [--nodes N]
[--set key=value ...] [--search] [--output DIR] [--top K] [--no-compile]`

Plans a training run on a simulated cluster: per-device memory (analytic, and XLA's analysis of the
real step compiled ahead of time for that many simulated CPU devices, nothing allocated), model
FLOPs, collective traffic (read from the compiled program, next to the analytic minimum), whether
it fits, and an estimated step time and MFU. `--search` ranges over meshes, ZeRO stages, remat and
micro-batches, for `--nodes` or for the fewest nodes that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from agx.config import load_experiment
from agx.errors import UserError, cli_exit
from agx.models.attention_choice import choose_attention
from agx.planning.systems import load_system
from agx.runtime import silence_plugin_failure

# XLA's CPU client packs the process index into device ids with 2048 (1 << 11) ids per process in
# newer releases (1 << 17 in jaxlib 0.5): a 2049th simulated device reads as another process and the
# compile fails with "Multiprocess computations aren't implemented on the CPU backend".
MAX_SIMULATED_DEVICES = 2048


def _simulate(devices: int) -> None:
    """Must run before jax is imported: that many CPU devices, and no accelerator."""
    if "jax" in sys.modules:
        raise RuntimeError("agx.plan must set up its simulated devices before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    silence_plugin_failure()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={min(devices, MAX_SIMULATED_DEVICES)}")


def _gib(n) -> str:
    return f"{n / 2**30:,.2f} GiB"


def report(plan, system) -> str:
    from agx.models.sizes import flops_per_token

    c, lines = plan.cfg, []
    lines.append(f"{c.name} on {plan.nodes} {system.name} node(s), {plan.devices} devices of {system.memory_gib:g} GiB: "
                 f"mesh {plan.mesh}, ZeRO-{c.mesh.zero_stage}, remat {c.model.remat}, "
                 f"{c.train.microbatches} micro-batch(es), sequence parallel {c.mesh.sequence_parallel}, {c.model.dtype}")
    lines.append(f"  model FLOPs per step: {flops_per_token(c.model) * c.train.batch_size * c.model.seq_len:.4g}")
    compiled = plan.compiled
    lines.append("  memory per device       analytic" + ("        compiled" if compiled else ""))
    for part in ("params", "grads", "opt_state", "activations", "temporaries"):
        lines.append(f"    {part:<20}{_gib(plan.memory[part]):>12}")
    if compiled:
        lines.append(f"    {'XLA arguments':<20}{'':>12}{_gib(compiled.memory['arguments']):>16}")
        lines.append(f"    {'XLA temporaries':<20}{'':>12}{_gib(compiled.memory['temporaries']):>16}")
    lines.append(f"    {'total':<20}{_gib(plan.memory['total']):>12}" +
                 (f"{_gib(compiled.memory['total']):>16}" if compiled else ""))
    lines.append("  collectives per device per step (analytic minimum):")
    for purpose, n in plan.collectives.items() or {"none": 0}.items():
        lines.append(f"    {purpose:<48}{_gib(n):>16}")
    if compiled:
        from agx.planning.analytic import minimum_by_kind

        minimum = minimum_by_kind(plan.collectives)
        lines.append(f"  collectives in the compiled step (compiled on {compiled.devices} devices{compiled.note}),"
                     " and the minimum by kind:")
        for kind, v in compiled.collectives.items() or {"none": {"count": 0, "bytes": 0}}.items():
            lines.append(f"    {kind:<20}{v['count']:>6} ops {_gib(v['bytes']):>16}{_gib(minimum.get(kind, 0)):>16}")
        moved = sum(v["bytes"] for v in compiled.collectives.values())
        least = sum(minimum.values())
        ratio = f"  {moved / least:.2f}x" if least else ""
        lines.append(f"    {'total':<30}{_gib(moved):>16}{_gib(least):>16}{ratio}")
    fits = compiled.memory["total"] <= system.memory_bytes if compiled else plan.fits
    lines.append(f"  fits in {system.memory_gib:g} GiB: {'yes' if fits else 'NO'}"
                 f" ({'compiled' if compiled else 'analytic'} figure)")
    lines.append(f"  estimated step {plan.step_s:.3g} s, MFU {plan.mfu:.1%} (peak {system.peak_tflops:g} TFLOP/s "
                 "per device; an upper bound)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agx.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--system", default="cpu", help="aurora, polaris, h100x8, cpu, or a JSON file")
    parser.add_argument("--nodes", type=int, help="default: 1, or with --search the fewest that fit")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--search", action="store_true", help="search layouts that fit")
    parser.add_argument("--top", type=int, default=3, help="with --search: layouts compiled and shown")
    parser.add_argument("--output", type=Path, help="with --search: write search.csv and memory.png here")
    parser.add_argument("--no-compile", action="store_true", help="analytic figures only")
    args = parser.parse_args(argv)
    try:
        system = load_system(args.system)
        cfg = load_experiment(args.experiment, args.set)
        attention = choose_attention(cfg.model, system.platform, system.compute_capability, max(cfg.mesh.context, 1))  # the system's
        cfg = dataclasses.replace(cfg, model=attention.applied(cfg.model))
        print(f"agx: attention on {system.name}: {attention.describe(cfg.model.seq_len)}")
        if args.nodes is not None and args.nodes < 1:
            raise UserError("--nodes must be at least 1")
        from agx.planning.search import fewest_nodes_bound, run_plan, run_search

        most = (args.nodes or 4 * fewest_nodes_bound(cfg, system)) * system.devices_per_node
        _simulate(most if not args.no_compile else 1)
        if args.search:
            print(run_search(cfg, system, args.nodes, args.top, args.output, not args.no_compile))
        else:
            print(report(run_plan(cfg, system, args.nodes or 1, not args.no_compile), system))
        return 0
    except UserError as e:
        return cli_exit(e)


if __name__ == "__main__":
    sys.exit(main())
