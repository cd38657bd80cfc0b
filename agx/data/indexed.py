"""Megatron's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`), read and written byte for byte.

`.idx` layout (little-endian), as megatron-core's `_IndexWriter` writes it:
  b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 sequence count S | u64 document count D
  | int32[S] sequence lengths | int64[S] byte offsets into .bin | int64[D] document indices
Document indices start at 0 and list, after each document, the number of sequences so far.
`.bin` is the tokens of every sequence back to back in that dtype.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from agx.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron-core's DType codes.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's choice: uint16 below 65500 tokens, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


class IndexedDataset:
    """Random access to sequences; `ds[i]` is a zero-copy view of the memory-mapped `.bin`.

    Pickles as its prefix and reopens the maps, so it can be shipped to loader worker processes.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise UserError(f"{path}: no such file (a dataset prefix names PREFIX.bin and PREFIX.idx)")
        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if len(self._index) < HEADER.size:
            raise UserError(f"{idx_path}: too short to be a Megatron index ({len(self._index)} bytes)")
        magic, version, code, num_sequences, num_documents = HEADER.unpack_from(self._index)
        if magic != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron indexed dataset (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise UserError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPES:
            raise UserError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        end = HEADER.size + num_sequences * 12 + num_documents * 8
        if len(self._index) < end:
            raise UserError(f"{idx_path}: truncated: {len(self._index)} bytes, the header promises {end}")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(self._index, np.int32, num_sequences, offset)
        offset += num_sequences * 4
        self.sequence_pointers = np.frombuffer(self._index, np.int64, num_sequences, offset)
        offset += num_sequences * 8
        self.document_indices = np.frombuffer(self._index, np.int64, num_documents, offset)

        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_path.stat().st_size else np.zeros(0, np.uint8)
        needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize \
            if num_sequences else 0
        if len(self._bin) < needed:
            raise UserError(f"{bin_path}: truncated: {len(self._bin)} bytes, the index needs {needed}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i."""
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getstate__(self):
        return self.prefix

    def __setstate__(self, prefix):
        self.__init__(prefix)


class IndexedDatasetBuilder:
    """Writes PREFIX.bin/.idx atomically: into temporary names, renamed into place by `finalize()`.
    An interrupted build (exception, or a crash) never leaves a dataset under PREFIX."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f".tmp-{os.getpid()}"
        self._bin = open(self.prefix + ".bin" + self._tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._document_ends = [0]
        self._count = 0

    def add_document(self, tokens) -> None:
        """Appends one document made of one sequence."""
        self.add_sequences([np.asarray(tokens)])

    def add_sequences(self, sequences: list[np.ndarray]) -> None:
        """Appends one document made of several sequences (Megatron's sentence-split documents)."""
        for tokens in sequences:
            array = np.asarray(tokens)
            if array.size and (array.min() < np.iinfo(self.dtype).min or array.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids out of range for {self.dtype}")
            self._bin.write(array.astype(self.dtype, copy=False).tobytes())
            self._lengths.append(np.array([array.size], np.int32))
        self._count += len(sequences)
        self._document_ends.append(self._count)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends many single-sequence documents at once: `tokens` is their concatenation."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, np.int32)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)
        self._document_ends.extend(range(self._count + 1, self._count + len(lengths) + 1))
        self._count += len(lengths)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.asarray(self._document_ends, np.int64)
        with open(self.prefix + ".idx" + self._tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODES[self.dtype], len(lengths), len(documents)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(documents.tobytes())
        # Old index out, then .bin, then .idx: a crash in between leaves no .idx, never a mismatched pair.
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        os.replace(self.prefix + ".bin" + self._tmp, self.prefix + ".bin")
        os.replace(self.prefix + ".idx" + self._tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for suffix in (".bin", ".idx"):
            Path(self.prefix + suffix + self._tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
