"""What checkpoint checksums cost; prints one JSON line.

    python tools/bench_checkpoint.py [--experiment gpt3_small] [--repeats 3]

Saves a TrainState of an experiment's shapes (parameters and Adam moments, float32, random) with agx's
Checkpoints, synchronously, `--repeats` times, then verifies and restores the newest step as a
resume does. Reported as medians: the save (of which the hashing: each process's part and the
commit's), the verify of every file, and Orbax's read of the state that follows it. The files are
in the page cache throughout (just written): on a cold file system the verify also pays the one
read from disk that the restore would otherwise pay, and Orbax's read then comes from the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from agx.checkpoint import Checkpoints, checksums  # noqa: E402
from agx.config import load_experiment  # noqa: E402
from agx.training.loop import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="gpt3_small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_experiment(args.experiment, ["checkpoint.async_save=false", "checkpoint.keep=100",
                                            "mesh.data=1", "mesh.fsdp=1"])
    trainer = Trainer.build(cfg, jax.devices()[:1])
    # Random values everywhere: the initial Adam moments are zeros, which the storage compresses away.
    noise = lambda x: jax.random.normal(jax.random.key(0), x.shape, x.dtype) if x.dtype.kind == "f" else x
    state = jax.tree.map(noise, trainer.init())
    figures = {"save_s": [], "hash_s": [], "verify_s": [], "read_s": []}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = Checkpoints(Path(scratch), cfg, trainer.plan.logical.params, log=lambda _: None)
        for step in range(1, args.repeats + 1):
            started = time.perf_counter()
            checkpoints.save(step, state, force=True)
            checkpoints.wait()
            figures["save_s"].append(time.perf_counter() - started)
            manifest = json.loads((checkpoints.directory / str(step) / checksums.MANIFEST).read_text())
            figures["hash_s"].append(sum(p["seconds"] for p in manifest["parts"]) + manifest["commit_seconds"])
            started = time.perf_counter()
            checksums.verify(checkpoints.directory / str(step))
            figures["verify_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            state_only = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.plan.abstract))
            jax.block_until_ready(checkpoints.manager.restore(step, args=state_only).state)
            figures["read_s"].append(time.perf_counter() - started)
        checkpoints.close()
    median = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    print(json.dumps({"experiment": args.experiment, "bytes": manifest["bytes"], "files": len(manifest["files"]),
                      **median, "hash_share_of_save": round(median["hash_s"] / median["save_s"], 3),
                      "verify_per_read": round(median["verify_s"] / median["read_s"], 3),
                      "repeats": args.repeats}))


if __name__ == "__main__":
    main()
