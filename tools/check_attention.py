"""Checks model.attention=cudnn against agx's own attention on this machine's GPU; prints one JSON line.

    python tools/check_attention.py [--experiment gpt3_small] [--set key=value ...]

The loss and gradients of one batch are computed three ways from the same parameters: agx's
attention in float32 (the reference), and agx's and cuDNN's attention in the experiment's 16-bit
dtype. cuDNN passes when its error against the reference is within twice agx's own 16-bit error
(plus 1e-3). Exit status 1 when it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agx.config import load_experiment  # noqa: E402
from agx.errors import UserError  # noqa: E402
from agx.runtime import choose_platform  # noqa: E402


def relative_error(got, want) -> float:
    import jax
    import jax.numpy as jnp

    squares = lambda tree: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))
    return float(jnp.sqrt(squares(jax.tree_util.tree_map(lambda a, b: a - b, got, want)) / squares(want)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="gpt3_small")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    choose_platform()
    try:
        cfg = load_experiment(args.experiment, args.set + ["model.attention=xla", "model.attention_block=0"])
        import jax

        from agx.data.dataset import make_loader
        from agx.training.loop import Trainer
        from agx.parallel.batch import batch_sharding
        from agx.training.step import loss_function

        trainer = Trainer.build(cfg)
        params = trainer.init().params
        tokens = next(make_loader(cfg, batch_sharding(trainer.mesh), num_batches=1))
        results = {}
        for name, attention, dtype in [("reference", "xla", "float32"), ("xla", "xla", cfg.model.dtype),
                                       ("cudnn", "cudnn", cfg.model.dtype)]:
            variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention, dtype=dtype))
            loss_fn = loss_function(variant.validate(), trainer.plan.layouts.params, trainer.pipeline, train=False)
            results[name] = jax.jit(jax.value_and_grad(loss_fn))(params, tokens, None)
    except UserError as e:
        print(f"agx: error: {e}", file=sys.stderr)
        return 2
    reference_loss, reference_grads = results["reference"]
    report = {"experiment": cfg.name, "device": jax.devices()[0].device_kind, "dtype": cfg.model.dtype,
              "reference_loss": float(reference_loss)}
    for name in ("xla", "cudnn"):
        loss, grads = results[name]
        report[f"{name}_loss_error"] = abs(float(loss) - float(reference_loss)) / abs(float(reference_loss))
        report[f"{name}_grad_error"] = relative_error(grads, reference_grads)
    report["passed"] = all(report[f"cudnn_{what}_error"] <= 2 * report[f"xla_{what}_error"] + 1e-3
                           for what in ("loss", "grad"))
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
