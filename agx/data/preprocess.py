"""Text files to a Megatron indexed dataset: each document tokenized, an end-of-document token appended.

`.jsonl`/`.json` files hold one JSON object per line and the document is its `text_key` field; any
other file is one document. Tokenizing runs in worker processes; the dataset is written atomically.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agx.data.indexed import IndexedDatasetBuilder, token_dtype
from agx.data.tokenizer import Tokenizer
from agx.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json")
CHUNK_BYTES = 1 << 20  # documents go to workers in chunks of about this much text


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    text_bytes: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def read_documents(paths: Sequence[Path], text_key: str) -> Iterator[str]:
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such input file")
        if path.suffix not in JSON_SUFFIXES:
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise UserError(f"{path}:{line_number}: has no string field {text_key!r} "
                                    "(choose the field with --json-key)")
                yield record[text_key]


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens of the chunk's documents back to back, each ending in EOD, and their lengths."""
    docs = _worker_tokenizer.encode(texts)
    lengths = np.array([len(d) + 1 for d in docs], np.int32)
    tokens = np.full(int(lengths.sum()), _worker_tokenizer.eod, np.int64)
    ends = np.cumsum(lengths)
    for doc, end in zip(docs, ends):
        tokens[end - 1 - len(doc):end - 1] = doc
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts)


def preprocess(inputs: Sequence[Path], output_prefix: str | os.PathLike, tokenizer: Tokenizer, *,
               text_key: str = "text", workers: int = 1, progress: bool = False) -> PreprocessStats:
    """Writes OUTPUT_PREFIX.bin/.idx; nothing appears under that name unless the whole run succeeds."""
    start = time.perf_counter()
    chunks = _chunks(read_documents(inputs, text_key))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
        encoded = pool.imap(_encode_chunk, chunks)
    else:
        _init_worker(tokenizer)
        encoded = map(_encode_chunk, chunks)
    documents = tokens = text_bytes = 0
    try:
        with IndexedDatasetBuilder(output_prefix, token_dtype(tokenizer.vocab_size)) as builder:
            for chunk_tokens, lengths, chunk_bytes in encoded:
                builder.add_documents(chunk_tokens, lengths)
                documents, tokens, text_bytes = documents + len(lengths), tokens + len(chunk_tokens), \
                    text_bytes + chunk_bytes
                if bar is not None:
                    bar.update(chunk_bytes)
                    bar.set_postfix(docs=documents, tokens=tokens)
            if documents == 0:
                raise UserError(f"no documents in {', '.join(map(str, inputs))}")
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return PreprocessStats(documents, tokens, text_bytes, time.perf_counter() - start)
