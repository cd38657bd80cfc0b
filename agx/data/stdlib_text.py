"""The built-in corpus: the running Python's standard library source, as bytes.

Real text present on every machine, so the default experiment trains on something with structure
without a download. Tokens are bytes (vocabulary 256); files are joined with a NUL end-of-document
byte, which never occurs in source text. The data-pipeline issue replaces this with Megatron's
indexed datasets and Grain.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

EOD = 0
VOCAB_SIZE = 256


def _corpus(max_bytes: int) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes().replace(b"\0", b"") + b"\0"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


class StdlibText:
    """Deterministic batches of random windows: batch(step) depends only on (seed, step), so a run
    that restarts at step s sees the same data as one that never stopped."""

    def __init__(self, seq_len: int, seed: int, max_bytes: int = 8 << 20):
        self.tokens = _corpus(max_bytes)
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """Returns int32 tokens [batch_size, seq_len + 1] (inputs and shifted targets)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return windows.astype(np.int32)
