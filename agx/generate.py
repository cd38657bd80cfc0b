"""`python -m agx.generate --checkpoint PATH --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
[--temperature T] [--top-k K] [--top-p P] [--seed S] [--set mesh.tensor=8 ...] [--json]`

PATH is a training workdir (its newest step), a step folder, a `python -m agx.export --format orbax`
folder, or a Hugging Face GPT-2 folder (safetensors). The weights are placed straight onto the mesh (`--set mesh.*`, default the checkpoint's
own), each device reading only its shard, and the prompts are sampled together as one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from agx.errors import RunError, UserError, cli_exit
from agx.runtime import choose_platform


def generate(checkpoint: Path, prompts: list[str], opts, overrides: list[str], tokenizer_path: Path | None):
    """Returns (completions, new token ids, {compile_s, sample_s})."""
    import numpy as np

    from agx.config import apply_override
    from agx.data.tokenizer import Tokenizer
    from agx.interop.saved import OrbaxParams, load_params
    from agx.parallel.mesh import build_mesh
    from agx.models.sampling import Sampler, check_prompts
    from agx.training.state import plan_params

    if (checkpoint / "config.json").is_file() and not (checkpoint / "params").is_dir():
        from agx.interop.hf_folder import HFParams

        source = HFParams(checkpoint)
    else:
        source = OrbaxParams(checkpoint)
    cfg = source.cfg
    for assignment in overrides:
        apply_override(cfg, assignment)
    cfg.validate()
    tokenizer_path = tokenizer_path or source.tokenizer_file()
    if tokenizer_path is None:
        raise UserError(f"{checkpoint}: its data named no tokenizer; give one with --tokenizer")
    tokenizer = Tokenizer(tokenizer_path, cfg.data.eod_token)
    ids = [p if len(p) else np.array([tokenizer.eod]) for p in tokenizer.encode(prompts)]  # empty: a new document
    check_prompts(ids, cfg.model.seq_len, opts.max_new_tokens)
    mesh = build_mesh(cfg.mesh)
    abstract, shardings = plan_params(cfg, mesh)
    source.check_matches(abstract)
    params = load_params(source, abstract, shardings)
    started = time.perf_counter()
    sampler = Sampler(cfg, mesh, shardings, len(ids), max(map(len, ids)), opts, tokenizer.eod).compile(params)
    compiled = time.perf_counter()
    new = sampler(params, ids)
    times = {"compile_s": compiled - started, "sample_s": time.perf_counter() - compiled}
    return [tokenizer.decode(t) for t in new], new, times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agx.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json, if the checkpoint names none")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="e.g. mesh.tensor=8 or model.dtype=bfloat16")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = parser.parse_args(argv)
    choose_platform()
    try:
        from agx.models.sampling import SamplingOptions

        opts = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                               not args.ignore_eod).check()
        texts, tokens, times = generate(args.checkpoint, args.prompt, opts, args.set, args.tokenizer)
    except (UserError, RunError) as e:
        return cli_exit(e)
    for prompt, text, ids in zip(args.prompt, texts, tokens):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": ids.tolist()}))
        else:
            print(f"{prompt}{text}\n{'-' * 40}")
    steps = args.max_new_tokens  # the compiled loop always runs them all
    print(f"agx: compiled in {times['compile_s']:.1f}s; sampled {len(tokens)} sequences x {steps} steps in "
          f"{times['sample_s']:.2f}s ({steps / times['sample_s']:.0f} steps/s, prefill included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
