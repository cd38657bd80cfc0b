"""The training loop: build everything from the config, resume from the newest checkpoint, run the
steps, report each one, evaluate and save when due, and stop cleanly on a signal or on faults."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from agx.checkpoint import Checkpoints
from agx.config import Config
from agx.data.cache import cache_root
from agx.data.dataset import make_loader
from agx.errors import RunError, UserError
from agx.models.attention_choice import AttentionChoice, for_device
from agx.models.sizes import flops_per_token
from agx.parallel.batch import batch_sharding, data_parallel_size
from agx.parallel.mesh import build_mesh, process_hosts, tensor_groups_across_hosts
from agx.parallel.pipeline import Schedule
from agx.training.evaluate import Evaluator
from agx.training.metrics import MetricsWriter, peak_tflops_per_device
from agx.training.optimizer import AdamW, make_optimizer
from agx.training.preemption import StopRequest
from agx.training.profile import Profile
from agx.training.state import StatePlan, TrainState, init_state, plan_state
from agx.training.step import make_train_step, pipeline_schedule


@dataclass
class Trainer:
    """Everything one run needs, built once: the mesh, the optimizer, the state plan, the jitted step."""

    cfg: Config
    mesh: Mesh
    tx: AdamW
    plan: StatePlan
    step_fn: object
    pipeline: Schedule | None  # None without pipeline stages
    attention: AttentionChoice  # what model.attention runs as on these devices; cfg holds it

    @classmethod
    def build(cls, cfg: Config, devices=None) -> Trainer:
        mesh = build_mesh(cfg.mesh, devices)
        attention = for_device(cfg.model, mesh.devices.flat[0], mesh.shape["context"])
        cfg = dataclasses.replace(cfg, model=attention.applied(cfg.model))
        data_parallel = data_parallel_size(mesh.shape)
        per_replica = cfg.train.batch_size // cfg.train.microbatches
        if per_replica % data_parallel:
            raise UserError(f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches} "
                            f"= {per_replica} is not divisible by the data-parallel degree data×fsdp={data_parallel}")
        if cfg.mesh.sequence_parallel and cfg.model.seq_len % mesh.shape["tensor"]:
            raise UserError(f"model.seq_len={cfg.model.seq_len} is not divisible by mesh.tensor={mesh.shape['tensor']}"
                            " (needed by mesh.sequence_parallel)")
        pipeline = pipeline_schedule(cfg, dict(mesh.shape))  # refuses a pipeline it cannot run, before the shapes do
        tx = make_optimizer(cfg)
        plan = plan_state(cfg, tx, mesh)
        step_fn = make_train_step(cfg, tx, plan, mesh, pipeline)
        return cls(cfg, mesh, tx, plan, step_fn, pipeline, attention)

    def init(self) -> TrainState:
        return init_state(self.plan, self.cfg.train.seed)

    def compile(self):
        """The step, lowered and compiled from abstract shapes alone: nothing is allocated."""
        B, T = self.cfg.train.batch_size, self.cfg.model.seq_len
        tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=batch_sharding(self.mesh))
        return self.step_fn.lower(self.plan.abstract, tokens).compile()

    def put_batch(self, tokens):
        return jax.device_put(tokens, batch_sharding(self.mesh))


def train(cfg: Config, workdir: Path, started: float | None = None) -> TrainState:
    """Trains to cfg.train.steps in `workdir`, resuming from its newest checkpoint; `started` is the
    process's start (time.perf_counter) for the time-to-first-step figure."""
    started = started or time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(workdir, cfg.train.log_every)
    log = writer.log
    loader = checkpoints = None
    stop = StopRequest().install()  # from here on a stop signal waits for the end of a step
    try:
        trainer = Trainer.build(cfg)
        mesh, B, T = trainer.mesh, cfg.train.batch_size, cfg.model.seq_len
        device = mesh.devices.flat[0]
        log(f"agx: {cfg.name}: {trainer.plan.num_params:,} parameters on mesh {dict(mesh.shape)} of "
            f"{mesh.devices.size} {device.platform} devices ({device.device_kind})")
        log(f"agx: attention: {trainer.attention.describe(T)}")
        if trainer.plan.padded:
            count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
            extra = count(trainer.plan.abstract.params) / count(trainer.plan.logical.params) - 1
            log(f"agx: the mesh does not divide every weight: they are stored padded with zeros, {extra:.2%} more "
                "elements (see the README's padded sharding)")
        schedule = trainer.pipeline
        if schedule:
            log(f"agx: pipeline: {schedule.name} schedule, {schedule.stages} stages, {schedule.microbatches} "
                f"micro-batches, {schedule.repeats} repeat(s): bubble {schedule.bubble_fraction:.1%} of each step "
                "(--dry-run and agx.plan estimate its activation memory)")
        spread = tensor_groups_across_hosts(mesh, process_hosts()) if jax.process_count() > 1 else []
        if spread:
            log(f"agx: warning: {len(spread)} of the {mesh.devices.size // mesh.shape['tensor']} tensor-parallel "
                f"groups span hosts ({', '.join(sorted(spread[0]))}, ...): their all-reduces cross the network; "
                "make mesh.tensor divide the devices per host")
        # Before the loader's workers start: on a CPU the peak is measured, and they would share its cores.
        peak, peak_source = peak_tflops_per_device(device, cfg.model.dtype, cfg.train.peak_tflops_per_device,
                                                    cache_root(cfg.data.cache_dir))
        log(f"agx: MFU against {peak:.4g} TFLOP/s per device ({peak_source})")
        loader = make_loader(cfg, batch_sharding(mesh), log=log)  # bad data fails before compiling
        timer = time.perf_counter()
        checkpoints = Checkpoints(workdir, cfg, trainer.plan.logical.params, log)  # a foreign or unusable workdir fails before compiling
        restored = checkpoints.restore(trainer.plan.target, loader.layout())
        resumed = restored is not None
        if resumed:
            state, position = restored
            loader.resume(position.start, position.iterator_state)
        else:
            state = trainer.init()
        restore_s = time.perf_counter() - timer
        first_step = int(state.step)

        if first_step >= cfg.train.steps:
            log(f"agx: already at step {first_step} of train.steps={cfg.train.steps}; nothing to do")
            return state

        evaluator = Evaluator(trainer.cfg, trainer.plan, mesh, trainer.pipeline, log) if cfg.eval.every else None
        # The first batch before compiling: a token id outside the vocabulary fails in seconds, and
        # the loader's workers read ahead while the step compiles.
        batches = itertools.chain([next(loader)], loader)
        timer = time.perf_counter()
        step_fn = trainer.compile()
        compile_s = time.perf_counter() - timer
        log(f"agx: compiled the training step in {compile_s:.1f}s")

        writer.start(first_step, cfg.train.steps)
        flops_per_step = flops_per_token(cfg.model) * B * T
        bad_in_a_row = 0
        with Profile(cfg.train.profile_steps, workdir / "profile", log) as profile:
            for step in range(first_step + 1, cfg.train.steps + 1):
                profile.before(step)
                batch = next(batches)
                timer = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
                # Every local device done with the step before another program's collectives start
                # (the evaluation's, the stop agreement's): two CPU programs in flight crossed gloo
                # messages (`op.preamble.length <= op.nbytes`) in two-process runs; suspected, not
                # proven (README, "The two-process resume test and load").
                jax.block_until_ready(state)
                step_s = time.perf_counter() - timer
                profile.after(step)
                tflops = flops_per_step / step_s / mesh.devices.size / 1e12
                record = {"step": step, **metrics, "step_s": step_s, "tokens_per_s": B * T / step_s,
                          "tokens_per_s_per_device": B * T / step_s / mesh.devices.size,
                          "model_tflops_per_s_per_device": tflops, "mfu": tflops / peak}
                if step == first_step + 1:
                    writer.event("startup", step=step, compile_s=compile_s, first_step_s=step_s,
                                 **{"restore_s" if resumed else "init_s": restore_s},
                                 time_to_first_step_s=time.perf_counter() - started)
                if metrics["skipped"]:
                    bad_in_a_row += 1
                    log(f"agx: step {step}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} is not "
                        f"finite; update skipped ({int(metrics['bad_steps'])} so far)")
                else:
                    bad_in_a_row = 0
                if evaluator and evaluator.due(step) and not bad_in_a_row:
                    record.update(evaluator(state.params))
                writer.step(record)
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    checkpoints.wait()
                    raise RunError(f"{bad_in_a_row} steps in a row up to step {step} had a non-finite loss or "
                                   f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); stopping. "
                                   f"Checkpoints {checkpoints.manager.all_steps()} are intact")
                stop_signal = stop.agreed()
                if not bad_in_a_row:  # the newest checkpoint is always a good step
                    checkpoints.save(step, state, loader, force=step == cfg.train.steps or bool(stop_signal))
                if stop_signal:
                    checkpoints.wait()
                    writer.event("stopped", step=step, signal=stop_signal)
                    log(f"agx: {stop_signal} at step {step}: newest checkpoint is step "
                        f"{checkpoints.manager.latest_step()}; exiting")
                    break
        checkpoints.wait()
        return state
    except RunError:
        if checkpoints is not None:
            checkpoints.wait()  # a failed save (a full disk, say) explains more than what failed after it
        raise
    finally:
        stop.uninstall()
        if checkpoints is not None:
            checkpoints.close()
        if loader is not None:
            loader.close()
        writer.close()
