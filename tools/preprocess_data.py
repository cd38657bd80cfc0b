"""Tokenizes text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input a.jsonl b.jsonl --output-prefix data/corpus \
        --tokenizer path/to/tokenizer.json [--json-key text] [--workers 8]

Each JSON line (or each non-JSON file) is one document and gets an end-of-document token. The
output is written under temporary names and renamed at the end: an interrupted run leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agx.data.preprocess import preprocess  # noqa: E402
from agx.data.tokenizer import Tokenizer  # noqa: E402
from agx.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, required=True, help=".jsonl/.json or plain text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer.json, or a folder holding one")
    parser.add_argument("--eod-token", default=None, help="end-of-document token (default: found in the vocab)")
    parser.add_argument("--json-key", default="text", help="the field of each JSON line that holds the text")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        stats = preprocess(args.input, args.output_prefix, Tokenizer(args.tokenizer, args.eod_token),
                           text_key=args.json_key, workers=args.workers, progress=not args.no_progress)
    except UserError as e:
        print(f"agx: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} tokens "
          f"in {stats.seconds:.1f}s ({stats.tokens_per_s:,.0f} tokens/s, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
