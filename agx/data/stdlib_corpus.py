"""The built-in corpus: the running Python's standard library source, one document per file.

Real code, present on every machine, so the default experiment trains on text with structure and
downloads nothing. On first use a byte-level BPE of the model's vocabulary size is trained on it and
the corpus is tokenized into an indexed dataset; both are cached, keyed by Python version and size.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from agx.data.cache import cache_root
from agx.data.preprocess import preprocess, read_documents
from agx.data.tokenizer import Tokenizer, train_bpe

MAX_BYTES = 16 << 20  # the first 16 MB of source, in sorted path order: enough text, a quick build


def stdlib_files(max_bytes: int = MAX_BYTES) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    return files


def stdlib_corpus(vocab_size: int, cache_dir: str | None = None, log=print) -> tuple[str, Path]:
    """Returns (dataset prefix, tokenizer.json path), building them on first use."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache_root(cache_dir) / f"stdlib-py{version}-bpe{vocab_size}"
    prefix, tokenizer_path = folder / "corpus", folder / "tokenizer.json"
    if not (tokenizer_path.is_file() and prefix.with_suffix(".idx").is_file()):
        files = stdlib_files()
        log(f"agx: building the built-in corpus in {folder}: {len(files)} standard-library files, "
            f"BPE vocabulary {vocab_size} (once)")
        if not tokenizer_path.is_file():
            train_bpe(read_documents(files, "text"), vocab_size, tokenizer_path)
        preprocess(files, prefix, Tokenizer(tokenizer_path))
    return str(prefix), tokenizer_path
