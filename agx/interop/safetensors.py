"""The safetensors format, written piece by piece and read without unpickling anything.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range)
and the raw little-endian tensor bytes. Because every shape is known before any data is read, the
header is written first and each tensor's bytes are then filled in one chunk at a time through a
short-lived memory map: a tensor is never whole in memory unless a chunk is the whole tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from agx.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(d): name for name, d in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # as the reference implementation


class SafetensorsWriter:
    """Lays out `tensors` ({name: (shape, dtype)}, in file order) and lets each be filled by slices."""

    def __init__(self, path: Path, tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
                 metadata: dict[str, str] | None = None):
        header, offset = {}, 0
        for name, (shape, dtype) in tensors.items():
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.path, self.tensors = path, tensors
        self.data_start = 8 + len(encoded)
        self.offsets = {name: entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(self.data_start + offset)

    def write(self, name: str, index: tuple[slice, ...], values: np.ndarray, as_shape=None) -> None:
        """Writes `values` into tensor `name` at `index`, slices of its shape or of `as_shape` (the same
        bytes seen in another row-major shape)."""
        shape, dtype = self.tensors[name]
        region = np.memmap(self.path, dtype=dtype, mode="r+", offset=self.data_start + self.offsets[name],
                           shape=as_shape or shape)
        region[index] = values
        region.flush()
        del region  # unmapped: its written pages leave this process's memory


class SafetensorsFile:
    """Read-only, memory-mapped tensors of one file: a tensor's bytes are read when sliced."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > MAX_HEADER_BYTES:
                    raise ValueError(f"header of {length} bytes")
                header = json.loads(f.read(length))
            self.data_start = 8 + length
            self.metadata = header.pop("__metadata__", {}) or {}
            self.entries = {name: (DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][0])
                            for name, e in header.items()}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, offset = self.entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + offset, shape=shape)


def sync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
