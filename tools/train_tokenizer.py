"""Trains a byte-level BPE tokenizer (GPT-2's scheme) on local text files; writes a tokenizer.json.

    python tools/train_tokenizer.py --input a.jsonl b.txt --vocab-size 32000 --output tok/tokenizer.json

`<|endoftext|>` is id 0 and the end-of-document token. JSON lines files contribute their `--json-key`
field; other files contribute their whole text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agx.data.preprocess import read_documents  # noqa: E402
from agx.data.tokenizer import train_bpe  # noqa: E402
from agx.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True, help="the tokenizer.json to write")
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = train_bpe(read_documents(args.input, args.json_key), args.vocab_size, args.output)
    except UserError as e:
        print(f"agx: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocabulary {args.vocab_size}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
