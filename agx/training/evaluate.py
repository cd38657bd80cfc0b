"""Validation loss and perplexity over a fixed set of batches: the first `eval.batches` of the
validation split, the same at every evaluation, so the numbers compare across steps and runs."""

from __future__ import annotations

import math

import jax

from agx.config import Config
from agx.data.loader import BatchLoader
from agx.data.gpt_samples import parse_split
from agx.data.dataset import make_samples
from agx.errors import UserError
from agx.parallel.batch import batch_sharding
from agx.parallel.pipeline import Schedule
from agx.training.state import StatePlan
from agx.training.step import make_eval_step


class Evaluator:
    def __init__(self, cfg: Config, plan: StatePlan, mesh, schedule: Schedule | None, log=print):
        self.cfg, self.sharding = cfg, batch_sharding(mesh)
        B, T = cfg.train.batch_size, cfg.model.seq_len
        if parse_split(cfg.data.split)[1] == 0:
            raise UserError(f"eval.every={cfg.eval.every} but data.split={cfg.data.split} leaves no validation "
                            "documents; give the split a validation share or set eval.every=0")
        self.samples = make_samples(cfg, "valid", cfg.eval.batches * B, log)
        tokens = jax.ShapeDtypeStruct((B, T + 1), "int32", sharding=self.sharding)
        self.eval_step = make_eval_step(cfg, plan, mesh, schedule).lower(plan.abstract.params, tokens).compile()

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    def __call__(self, params) -> dict:
        cfg = self.cfg
        loader = BatchLoader(self.samples, cfg.train.batch_size, cfg.eval.batches, self.sharding, cfg.model.seq_len)
        losses = [self.eval_step(params, tokens) for tokens in loader]
        loss = sum(float(x) for x in jax.device_get(losses)) / len(losses)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
