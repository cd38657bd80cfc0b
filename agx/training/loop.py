"""The training loop: build everything from the config, run the steps, report each one."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from agx.config import Config
from agx.data.pipeline import make_loader
from agx.errors import UserError
from agx.models.configs import flops_per_token
from agx.parallel.mesh import build_mesh
from agx.training.optimizer import lr_schedule, make_optimizer
from agx.training.state import StatePlan, TrainState, init_state, plan_state
from agx.training.step import batch_sharding, make_train_step


@dataclass
class Trainer:
    """Everything one run needs, built once: the mesh, the optimizer, the state plan, the jitted step."""

    cfg: Config
    mesh: Mesh
    tx: optax.GradientTransformation
    plan: StatePlan
    step_fn: object

    @classmethod
    def build(cls, cfg: Config, devices=None) -> Trainer:
        mesh = build_mesh(cfg.mesh, devices)
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        per_replica = cfg.train.batch_size // cfg.train.microbatches
        if per_replica % data_parallel:
            raise UserError(f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches} "
                            f"= {per_replica} is not divisible by the data-parallel degree data×fsdp={data_parallel}")
        if cfg.mesh.sequence_parallel and cfg.model.seq_len % mesh.shape["tensor"]:
            raise UserError(f"model.seq_len={cfg.model.seq_len} is not divisible by mesh.tensor={mesh.shape['tensor']}"
                            " (needed by mesh.sequence_parallel)")
        tx = make_optimizer(cfg)
        plan = plan_state(cfg, tx, mesh)
        return cls(cfg, mesh, tx, plan, make_train_step(cfg, tx, lr_schedule(cfg), plan, mesh))

    def init(self) -> TrainState:
        return init_state(self.cfg, self.tx, self.plan)

    def put_batch(self, tokens):
        return jax.device_put(tokens, batch_sharding(self.mesh))


def train(cfg: Config, workdir: Path, log=print) -> TrainState:
    trainer = Trainer.build(cfg)
    log(f"agx: {cfg.name}: {trainer.plan.num_params:,} parameters on mesh "
        f"{dict(trainer.mesh.shape)} of {trainer.mesh.devices.size} {jax.devices()[0].platform} devices")
    B, T = cfg.train.batch_size, cfg.model.seq_len
    loader = make_loader(cfg, batch_sharding(trainer.mesh), log=log)  # bad data fails before compiling
    start = time.perf_counter()
    tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=batch_sharding(trainer.mesh))
    step_fn = trainer.step_fn.lower(trainer.plan.abstract, tokens).compile()  # from shapes alone
    log(f"agx: compiled the training step in {time.perf_counter() - start:.1f}s")
    state = trainer.init()

    workdir.mkdir(parents=True, exist_ok=True)
    flops_per_step = flops_per_token(cfg.model) * B * T
    try:
        with open(workdir / "metrics.jsonl", "w") as metrics_file:
            for step in range(cfg.train.steps):
                batch = next(loader)
                start = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step_s = time.perf_counter() - start
                record = {"step": step + 1, **metrics, "step_s": step_s, "tokens_per_s": B * T / step_s,
                          "model_tflops_per_s_per_device": flops_per_step / step_s / trainer.mesh.devices.size / 1e12}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                    log(f"step {step + 1:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                        f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                        f"{step_s * 1e3:.0f} ms")
    finally:
        loader.close()
    return state
