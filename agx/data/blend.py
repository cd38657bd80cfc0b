"""Mixing many datasets by weight, as Megatron does.

Sources come as Megatron's `--data-path` list (`w1 prefix1 w2 prefix2 ...`, or one bare prefix) or as
the ALCF data-file list used for the Aurora runs: a file of `weight prefix corpus` lines. At every
prefix of the blended stream each dataset is within one sample of its share (see `blending_indices`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agx.data.cache import cache_root, cached_arrays, file_identity
from agx.data.gpt_samples import GPTSamples, split_ranges
from agx.data.indexed import IndexedDataset
from agx.errors import UserError

SURPLUS = 0.005  # each dataset builds this much more than its share (Megatron's default)


@dataclass(frozen=True)
class Source:
    weight: float
    prefix: str
    corpus: str


def _source(weight: str, prefix: str, corpus: str | None, where: str) -> Source:
    """One checked entry: a positive number and a prefix whose .bin and .idx exist."""
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"{where}: weight {weight!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise UserError(f"{where}: weight {weight} must be positive")
    missing = [prefix + s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
    if missing:
        raise UserError(f"{where}: dataset {prefix} is missing {' and '.join(missing)}")
    return Source(value, prefix, corpus or Path(prefix).name)


def read_data_file_list(path: Path) -> list[Source]:
    """`weight prefix [corpus]` per line; `#` starts a comment; relative prefixes are taken from the
    list's own folder."""
    sources = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) not in (2, 3):
            raise UserError(f"{where}: expected 'weight prefix [corpus]', got {line.strip()!r}")
        prefix = fields[1] if Path(fields[1]).is_absolute() else str(path.parent / fields[1])
        sources.append(_source(fields[0], prefix, fields[2] if len(fields) == 3 else None, where))
    if not sources:
        raise UserError(f"{path}: the data-file list names no datasets")
    return sources


def parse_sources(paths: str) -> list[Source]:
    """`data.paths`: a data-file list, one prefix, or `w1 prefix1 w2 prefix2 ...`."""
    fields = paths.split()
    if len(fields) == 1 and Path(fields[0]).is_file() and not Path(fields[0] + ".idx").is_file():
        return read_data_file_list(Path(fields[0]))
    if len(fields) == 1:
        return [_source("1", fields[0], None, "data.paths")]
    if len(fields) % 2:
        raise UserError(f"data.paths: expected 'weight prefix' pairs, got {len(fields)} fields")
    return [_source(weight, prefix, None, "data.paths") for weight, prefix in zip(fields[::2], fields[1::2])]


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the dataset it comes from and that dataset's running count.

    Earliest deadline first (Tijdeman's chairman-assignment schedule): dataset d's k-th sample may be
    taken at step n once k - s <= w_d·n, and is due by the step where w_d·n reaches k - 1 + s,
    with s = 1 - 1/(2D - 2).
    Among the datasets allowed to go, the one due first goes (the lowest index on ties). Every count
    then stays within s < 1 of w_d·n at every prefix n. Megatron's rule (largest `w_d·max(n, 1) -
    count` before the step) drifts further, up to 1.76 samples with skewed weights, so agx does not
    copy its order. Two heaps make this O(size · log D): a thousand datasets cost no more than three.
    """
    w = np.asarray(weights, np.float64).tolist()
    D = len(w)
    slack = 1.0 - 1.0 / (2 * D - 2) if D > 1 else 1.0
    counts = [0] * D
    dataset_index = np.empty(size, np.int16 if D < np.iinfo(np.int16).max else np.int32)
    sample_index = np.empty(size, np.int64)
    eps = 1e-9
    waiting = [((1 - slack) / w_d, d) for d, w_d in enumerate(w)]  # (release step, dataset)
    heapq.heapify(waiting)
    ready: list[tuple[float, int]] = []  # (deadline step, dataset)
    for n in range(1, size + 1):
        while waiting and waiting[0][0] <= n + eps:
            _, d = heapq.heappop(waiting)
            heapq.heappush(ready, ((counts[d] + slack) / w[d], d))
        _, d = heapq.heappop(ready)
        dataset_index[n - 1], sample_index[n - 1] = d, counts[d]
        counts[d] += 1
        heapq.heappush(waiting, ((counts[d] + 1 - slack) / w[d], d))
    return dataset_index, sample_index


class BlendedSamples:
    """`blend[i]` for i < num_samples: tokens [seq_len + 1] from the dataset the blending rule picks."""

    def __init__(self, sources: list[Source], split: str, which: int, seq_len: int, num_samples: int, seed: int,
                 cache_dir: str | None = None, vocab_size: int | None = None):
        total = sum(s.weight for s in sources)
        self.sources, self.weights = sources, np.array([s.weight / total for s in sources])
        self.datasets = []
        for source, weight in zip(sources, self.weights):
            dataset = IndexedDataset(source.prefix)
            documents = split_ranges(split, len(dataset))[which]
            wanted = math.ceil(weight * num_samples * (1 + SURPLUS))
            self.datasets.append(GPTSamples(dataset, documents, seq_len, wanted, seed, cache_dir, vocab_size))
        self.num_samples = num_samples
        if len(sources) == 1:
            self.dataset_index = np.zeros(num_samples, np.int16)
            self.dataset_sample_index = np.arange(num_samples)
        else:
            description = {"kind": "BlendedSamples", "weights": self.weights.tolist(), "size": num_samples,
                           "datasets": [file_identity(s.prefix + ".idx") for s in sources]}
            self.dataset_index, self.dataset_sample_index = cached_arrays(
                cache_root(cache_dir) / "indices", description, ("dataset_index", "dataset_sample_index"),
                lambda: blending_indices(self.weights, num_samples))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
