"""Data-pipeline benchmark; prints one JSON line.

    python tools/bench_data.py [--datasets 1000] [--samples 100000] [--batches 200] [--workers 2]

- preprocessing: the built-in corpus's files tokenized with its BPE, in tokens/s;
- index build: per-dataset sample indices and the blend over `--datasets` small datasets listed in
  a data-file list, cold (nothing cached) and warm (all cached);
- loader: `gpt3_tiny` global batches per second through the Grain loader with worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from agx.config import load_experiment  # noqa: E402
from agx.data.blend import BlendedSamples, parse_sources  # noqa: E402
from agx.data.indexed import IndexedDatasetBuilder  # noqa: E402
from agx.data.preprocess import preprocess  # noqa: E402
from agx.data.stdlib_corpus import stdlib_corpus, stdlib_files  # noqa: E402
from agx.data.tokenizer import Tokenizer  # noqa: E402


def bench_preprocess(tokenizer: Path, workers: int, scratch: Path) -> dict:
    stats = preprocess(stdlib_files(), scratch / "stdlib", Tokenizer(tokenizer), workers=workers)
    return {"preprocess_tokens_per_s": round(stats.tokens_per_s), "preprocess_tokens": stats.tokens,
            "preprocess_workers": workers}


def bench_index_build(num_datasets: int, num_samples: int, scratch: Path) -> dict:
    rng = np.random.default_rng(0)
    lines = []
    for k in range(num_datasets):
        prefix = scratch / "many" / f"ds{k:04d}"
        with IndexedDatasetBuilder(prefix) as builder:
            lengths = rng.integers(50, 400, 40)
            builder.add_documents(rng.integers(1, 2000, lengths.sum()), lengths)
        lines.append(f"{rng.random() + 0.1:.4f} {prefix} corpus{k % 10}")
    (scratch / "many.txt").write_text("\n".join(lines) + "\n")
    timings = {}
    for run in ("cold", "warm"):
        start = time.perf_counter()
        blend = BlendedSamples(parse_sources(str(scratch / "many.txt")), "990,10,0", 0, 128, num_samples, 0,
                               str(scratch / "cache"))
        blend[num_samples - 1]
        timings[f"index_build_{run}_s"] = round(time.perf_counter() - start, 2)
    return {"index_datasets": num_datasets, "index_samples": num_samples, **timings}


def bench_loader(batches: int, workers: int) -> dict:
    import jax

    from agx.data.dataset import make_loader
    from agx.parallel.mesh import build_mesh
    from agx.parallel.batch import batch_sharding

    cfg = load_experiment("gpt3_tiny", [f"data.workers={workers}"])
    loader = make_loader(cfg, batch_sharding(build_mesh(cfg.mesh, jax.devices())), num_batches=batches + 10,
                         log=lambda *_: None)
    for _ in range(10):  # start the workers, fill the buffers
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader).block_until_ready()
    seconds = time.perf_counter() - start
    loader.close()
    return {"loader_batches_per_s": round(batches / seconds, 1), "loader_batch": list(loader.global_shape),
            "loader_workers": workers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count()))
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _, tokenizer = stdlib_corpus(load_experiment("gpt3_tiny").model.vocab_size)
    with tempfile.TemporaryDirectory() as scratch:
        report = {**bench_preprocess(tokenizer, args.workers, Path(scratch)),
                  **bench_index_build(args.datasets, args.samples, Path(scratch)),
                  **bench_loader(args.batches, args.workers)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
