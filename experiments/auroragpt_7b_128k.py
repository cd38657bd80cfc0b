"""AuroraGPT-7B at 131,072 positions: 32 sequences a step, each split over 32 devices (mesh.context;
agx.parallel.context), with full recompute. `python -m agx.plan --experiment auroragpt_7b_128k
--system aurora` shows what it takes."""

import dataclasses

from agx.recipes import auroragpt_experiment


def config():
    cfg = auroragpt_experiment("auroragpt_7b", seq_len=131072, context=32)
    cfg.model = dataclasses.replace(cfg.model, remat="full")
    return cfg
