"""`python -m agx.train --experiment NAME_OR_PATH [--set key=value ...] [--workdir DIR] [--dry-run]`"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from agx.config import Config, load_experiment
from agx.errors import RunError, UserError, cli_exit, whole_lines_on_stderr
from agx import runtime


def dry_run(cfg: Config) -> dict:
    """Plans the run from abstract shapes only: nothing is allocated, so any size works anywhere."""
    from agx.models.sizes import flops_per_token, param_count
    from agx.parallel import zero
    from agx.planning.analytic import activation_bytes
    from agx.training.loop import Trainer

    trainer = Trainer.build(cfg)  # checks the mesh, the batch and the model's divisibility
    plan, mesh = trainer.plan, trainer.mesh
    bytes_per_device = {part: zero.bytes_per_device(getattr(plan.abstract, part),
                                                    zero.mesh_specs(getattr(plan.shardings, part)), mesh.shape, part)
                        for part in ("params", "opt_state")}
    assert plan.num_params == param_count(cfg.model), "the analytic count disagrees with the model"
    return {"experiment": cfg.name, "params": plan.num_params, "flops_per_token": flops_per_token(cfg.model),
            "mesh": dict(mesh.shape), "devices": mesh.devices.size, "zero_stage": cfg.mesh.zero_stage,
            "param_bytes_per_device": bytes_per_device["params"],
            "opt_state_bytes_per_device": bytes_per_device["opt_state"],
            "activation_bytes_per_device": activation_bytes(trainer.cfg, dict(mesh.shape), trainer.pipeline),
            "attention": {"kind": trainer.attention.attention, "block": trainer.attention.block,
                          "why": trainer.attention.why},
            "pipeline": trainer.pipeline.describe() if trainer.pipeline else None}


def _print_config(cfg: Config) -> None:
    def walk(prefix, node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                print(f"{prefix}{f.name} = {value!r}")

    walk("", cfg)


def writable_workdir(workdir: Path) -> Path:
    """The workdir, made if need be and shown to take a write, before anything starts: a file in its
    place, a read-only or a full file system is one line now, not a traceback after compiling."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--workdir {workdir} is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"--workdir {workdir} cannot be made: {e.strerror}") from None
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a folder")
    probe = workdir / f".agx-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # one block: a full file system has none to give
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"--workdir {workdir} is not writable: {e.strerror}") from None
    finally:
        probe.unlink(missing_ok=True)
    return workdir


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m agx.train", description=__doc__)
    parser.add_argument("--experiment", required=True, help="name in experiments/ or path to a .py file")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. train.steps=100 (several may follow one --set)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints, metrics, logs (default: runs/EXPERIMENT); a second run resumes there")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan; build nothing")
    args = parser.parse_args(argv)
    with whole_lines_on_stderr():
        return _run(args, started)


def _run(args, started: float) -> int:
    try:
        cfg = load_experiment(args.experiment, args.set)
        if args.dry_run:
            runtime.choose_platform(cfg.runtime.platform)
            _print_config(cfg)
            print(json.dumps(dry_run(cfg)))
            return 0
        workdir = writable_workdir(args.workdir or Path("runs") / cfg.name)
        runtime.start(cfg.runtime)
        from agx.training.loop import train

        train(cfg, workdir, started)
        return 0
    except (UserError, RunError) as e:
        return cli_exit(e)


if __name__ == "__main__":
    sys.exit(main())
