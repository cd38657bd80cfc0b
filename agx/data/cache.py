"""The on-disk cache for index arrays and the built-in corpus, keyed by a hash of what made them.

Every file is written under a temporary name and renamed: processes that build the same entry at
once all succeed, and a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import BinaryIO
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the arrays a key describes are built differently


def cache_root(configured: str | None = None) -> Path:
    """`data.cache_dir`, else $AGX_CACHE_DIR, else ~/.cache/agx."""
    return Path(configured or os.environ.get("AGX_CACHE_DIR") or Path.home() / ".cache" / "agx")


def file_identity(path: str | os.PathLike) -> dict:
    """Enough to notice that a file was rewritten: its real path, size and modification time."""
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def key_of(description: dict) -> str:
    text = json.dumps({"format": FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls write(file) on a temporary file, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def cached_arrays(directory: Path, description: dict, names: tuple[str, ...],
                  build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Loads the named arrays (memory-mapped) if an earlier run built them for the same description,
    else builds and saves them. The description is stored beside them for people to read."""
    key = key_of(description)
    paths = [directory / f"{key}-{name}.npy" for name in names]
    if not all(p.is_file() for p in paths):
        arrays = build()
        for path, array in zip(paths, arrays):
            write_atomic(path, lambda f: np.save(f, array))
        text = json.dumps(description, indent=1, sort_keys=True, default=str)
        write_atomic(directory / f"{key}-description.json", lambda f: f.write(text.encode()))
    return tuple(np.load(p, mmap_mode="r") for p in paths)
