"""Export and import of agx checkpoints.

  python -m agx.export --checkpoint WORKDIR_OR_STEP_DIR --format {orbax,hf} --output DIR [--dtype bf16|fp32]
  python -m agx.export --from-hf HF_DIR [--experiment NAME] [--set KEY=VALUE ...] --output WORKDIR

`orbax`: the parameters alone (no optimizer state) in the chosen dtype, with config.json and the
tokenizer beside them: what `agx.generate` and inference services load. `hf`: a Hugging Face folder,
GPT-2 for the GPT-3 architecture and Llama for the Llama one. `--from-hf`: a GPT-2 or Llama folder
(safetensors only) made into step 0 of a training workdir, which `agx.train` then continues from:
the model's shape is read from its config.json, the training recipe taken from the experiment when
one is named, else from agx's defaults; WORKDIR/experiment.py holds the result.
Outputs appear complete or not at all.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import pprint
import re
import shutil
import sys
from pathlib import Path

from agx.errors import RunError, UserError, cli_exit
from agx.runtime import choose_platform

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip().upper())
    if not match:
        raise UserError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def _return_freed_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after the first large free, then keeps freed chunk buffers in
    its arenas: streaming many equal chunks would then grow the heap far past one chunk. A fixed
    threshold (mallopt M_MMAP_THRESHOLD) keeps every large buffer a mapping, unmapped when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def export(checkpoint: Path, fmt: str, output: Path, dtype: str, force: bool, max_shard_bytes: int) -> None:
    _return_freed_buffers_to_the_os()
    import jax
    import ml_dtypes
    import numpy as np

    from agx.config import MeshConfig
    from agx.data.tokenizer import Tokenizer
    from agx.interop.hf_folder import write_hf
    from agx.interop.saved import OrbaxParams, atomic_folder, load_params
    from agx.parallel.mesh import build_mesh
    from agx.training.state import plan_params

    source = OrbaxParams(checkpoint)
    cfg = source.cfg
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    tokenizer = source.tokenizer_file()
    written = fmt
    with atomic_folder(output, force) as tmp:
        if fmt == "hf":
            one_device = build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
            source.check_matches(plan_params(cfg, one_device)[0])
            eod = Tokenizer(tokenizer, cfg.data.eod_token).eod if tokenizer else None
            written = f"hf {write_hf(source, cfg.model, tmp, np_dtype, tokenizer, eod, max_shard_bytes)}"
        else:
            import orbax.checkpoint as ocp

            from agx.checkpoint import chunked

            cfg.mesh = MeshConfig(data=-1, fsdp=1, tensor=1, zero_stage=3)
            devices = jax.devices()
            for n in range(len(devices), 0, -1):  # spread over the most devices that divide every weight
                try:
                    abstract, shardings = plan_params(cfg, build_mesh(cfg.mesh, devices[:n]))
                    break
                except UserError:  # would pad: an export holds the logical shapes
                    if n == 1:
                        raise
            source.check_matches(abstract)
            tree = {"params": load_params(source, abstract, shardings, np_dtype)}
            with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
                checkpointer.save(tmp / "params", args=ocp.args.StandardSave(tree, save_args=chunked(tree)))
            (tmp / "config.json").write_text(json.dumps({**cfg.to_dict(), "export": {
                "dtype": dtype, "from": str(source.step_dir)}}, indent=2))
            if tokenizer:
                shutil.copy2(tokenizer, tmp / "tokenizer.json")
    print(f"agx: exported {source.step_dir} as {written} ({dtype}) to {output}")


def import_hf(folder: Path, experiment: str | None, overrides: list[str], output: Path, force: bool) -> None:
    """The folder's weights as step 0 of a training workdir, with the model's shape read from its
    config.json, and the training recipe from `experiment` or else agx's defaults (agx.config).
    The resolved config is written to OUTPUT/experiment.py, which `agx.train` then runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from agx.checkpoint import Checkpoints
    from agx.interop.hf_folder import HFParams
    from agx.interop.saved import atomic_folder, flat, load_params
    from agx.training.loop import Trainer
    from agx.training.state import TrainState

    source = HFParams(folder)
    cfg = _import_config(source, experiment, overrides)
    trainer = Trainer.build(cfg)
    plan = trainer.plan
    source.bind(cfg.model, {name: a.shape for name, a in flat(plan.logical.params).items()})
    params = load_params(source, plan.abstract.params, plan.shardings.params, np.float32)
    zero = jax.device_put(jnp.zeros((), jnp.int32), plan.shardings.step)
    state = TrainState(step=zero, bad_steps=zero, params=params,
                       opt_state=jax.jit(trainer.tx.init, out_shardings=plan.shardings.opt_state)(params))
    with atomic_folder(output, force) as tmp:
        checkpoints = Checkpoints(tmp, cfg, plan.logical.params, log=lambda *_: None)
        checkpoints.save(0, state, force=True)
        checkpoints.wait()
        checkpoints.close()
        if (folder / "tokenizer.json").is_file():
            shutil.copy2(folder / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "experiment.py").write_text(EXPERIMENT_FILE.format(
            folder=folder, recipe=f"experiment '{experiment}'" if experiment else "agx's defaults",
            config=pprint.pformat(cfg.to_dict(), indent=4, width=100, sort_dicts=False)))
    print(f"agx: imported {folder} as step 0 of {output}; continue training with\n"
          f"  python -m agx.train --experiment {output / 'experiment.py'} --workdir {output}")


EXPERIMENT_FILE = '''"""Written by `python -m agx.export --from-hf {folder}`: the model's shape from its config.json,
the training recipe from {recipe}. Edit it, or change a setting with --set."""

from agx.config import Config


def config() -> Config:
    return Config.from_dict(
{config})
'''


def _import_config(source, experiment: str | None, overrides: list[str]):
    """The import's config: the folder's model shape over the experiment's (saying what it replaced)
    or over agx's defaults; a `--set` that contradicts the folder is refused."""
    from agx.config import apply_override, load_experiment, overridden_keys, with_overrides

    shape_fields = {f"model.{k}": k for k in source.model_shape}
    said = copy.deepcopy(source.cfg)  # the shape `--set` gives, parsed: 0.00001 is 1e-05
    shape_sets = [(o, shape_fields[key]) for o, key in zip(overrides, overridden_keys(overrides)) if key in shape_fields]
    for assignment, _ in shape_sets:
        apply_override(said, assignment)
    contradicted = [f"--set {assignment}, but its config.json has {source.model_shape[k]}"
                    for assignment, k in shape_sets if getattr(said.model, k) != source.model_shape[k]]
    if contradicted:
        raise UserError(f"{source.folder}: {'; '.join(contradicted)}")
    if experiment is None:
        return with_overrides(source.cfg, overrides)
    cfg = load_experiment(experiment, overrides)
    replaced = [f"model.{k}={v} (the experiment has {getattr(cfg.model, k)})"
                for k, v in source.model_shape.items() if getattr(cfg.model, k) != v]
    for k, v in source.model_shape.items():
        setattr(cfg.model, k, v)
    cfg.validate()
    if replaced:
        print(f"agx: the model's shape comes from {source.folder}/config.json: {', '.join(replaced)}")
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agx.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a training workdir (its newest step) or a step folder")
    source.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="import a local GPT-2 or Llama folder (safetensors)")
    parser.add_argument("--format", choices=("orbax", "hf"), help="with --checkpoint: what to write")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="exported parameter dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors file (default 5GB)")
    parser.add_argument("--experiment", help="with --from-hf: the training recipe (default: agx's defaults); the "
                        "model's shape always comes from the folder's config.json")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="with --from-hf")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    choose_platform()
    try:
        if args.checkpoint:
            if not args.format:
                raise UserError("--checkpoint needs --format orbax or --format hf")
            export(args.checkpoint, args.format, args.output, DTYPES[args.dtype], args.force,
                   _size(args.max_shard_size))
        else:
            import_hf(args.from_hf, args.experiment, args.set, args.output, args.force)
        return 0
    except (UserError, RunError) as e:
        return cli_exit(e)


if __name__ == "__main__":
    sys.exit(main())
