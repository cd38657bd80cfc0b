"""Pipeline parallelism: every schedule and mesh computes the loss and gradients of the plain model,
bubbles leak nothing, the stage-input policy saves memory, stages talk by collective-permute, and
checkpoints move between pipelined and plain layouts."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (TINY, agx_train, assert_same_run, batch, env_for, llama_tiny_config, one_error_line, records,
                      run_steps, sets, tiny_config)

from agx.parallel import pipeline
from agx.parallel.batch import batch_sharding, row_groups
from agx.parallel.mesh import Layout, build_mesh, logical_rules
from agx.planning.compiled import compile_step
from agx.training.loop import Trainer
from agx.training.step import loss_function, pipeline_schedule

LAYERS = 8  # divisible by every stages × repeats below

# (P, R, M), the other mesh axes, ZeRO stage, sequence parallel, schedule
CASES = [
    ((2, 1, 2), {"data": 4}, 1, False, "gpipe"),
    ((4, 1, 4), {"fsdp": 2}, 3, False, "gpipe"),
    ((4, 1, 8), {"tensor": 2}, 1, False, "gpipe"),
    ((2, 2, 4), {"data": 2, "tensor": 2}, 2, False, "gpipe"),
    ((4, 2, 8), {"fsdp": 2}, 3, False, "gpipe"),
    ((2, 2, 4), {"fsdp": 2, "tensor": 2}, 3, True, "gpipe"),
    ((4, 1, 8), {"data": 2}, 1, False, "1f1b"),
    ((2, 1, 4), {"fsdp": 2, "tensor": 2}, 3, True, "1f1b"),
]


def pipelined(P, R, M, zero_stage=1, sequence_parallel=False, schedule="gpipe", make_config=tiny_config, **mesh):
    cfg = make_config(pipeline=P, zero_stage=zero_stage, sequence_parallel=sequence_parallel, **mesh)
    cfg.model.num_layers, cfg.pipeline.repeats, cfg.pipeline.microbatches = LAYERS, R, M
    cfg.pipeline.schedule = schedule
    return cfg


def plain(make_config=tiny_config):
    cfg = make_config()
    cfg.model.num_layers = LAYERS
    return cfg


def loss_and_grads(cfg, corpus, devices, bubble_value=0.0):
    trainer = Trainer.build(cfg, devices)
    loss_fn = loss_function(cfg, trainer.plan.layouts.params, trainer.pipeline, train=True, bubble_value=bubble_value)
    value_and_grad = jax.jit(jax.value_and_grad(lambda params, tokens: loss_fn(params, tokens, None)),
                             in_shardings=(trainer.plan.shardings.params, batch_sharding(trainer.mesh)))
    loss, grads = value_and_grad(trainer.init().params, trainer.put_batch(batch(corpus, 0, cfg.train.batch_size)))
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference(corpus):
    return loss_and_grads(plain(), corpus, jax.devices()[:1])


def assert_same_gradients(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(jax.tree_util.tree_leaves(ref_grads)) >= 10  # embeddings, every layer weight, ln_f
    for (path, g), ref in zip(flat, jax.tree_util.tree_leaves(ref_grads)):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        error = np.linalg.norm(g - ref) / np.linalg.norm(ref)
        assert error <= 1e-5, (jax.tree_util.keystr(path), error)


@pytest.mark.parametrize("prm,mesh,zero_stage,sequence_parallel,schedule", CASES,
                         ids=[f"{s}-P{p}R{r}M{m}-" + "-".join(f"{k}{v}" for k, v in mesh.items()) + f"-zero{z}" + ("-sp" if sp else "")
                              for (p, r, m), mesh, z, sp, s in CASES])
def test_loss_and_every_gradient_match_the_plain_model(prm, mesh, zero_stage, sequence_parallel, schedule, corpus,
                                                       reference):
    cfg = pipelined(*prm, zero_stage=zero_stage, sequence_parallel=sequence_parallel, schedule=schedule, **mesh)
    assert_same_gradients(loss_and_grads(cfg, corpus, jax.devices()), reference)


@pytest.mark.parametrize("prm,mesh,zero_stage,sequence_parallel,schedule", [
    ((2, 2, 4), {"fsdp": 2, "tensor": 2}, 3, True, "gpipe"),  # the KV heads split over tensor
    ((2, 1, 4), {"tensor": 4}, 1, False, "1f1b"),  # the KV heads whole on every tensor rank
])
def test_llama_loss_and_every_gradient_match_the_plain_model(prm, mesh, zero_stage, sequence_parallel, schedule,
                                                             corpus):
    """Rotary positions, grouped-query attention, the untied head: the pipeline does not care."""
    cfg = pipelined(*prm, zero_stage=zero_stage, sequence_parallel=sequence_parallel, schedule=schedule,
                    make_config=llama_tiny_config, **mesh)
    assert_same_gradients(loss_and_grads(cfg, corpus, jax.devices()),
                          loss_and_grads(plain(llama_tiny_config), corpus, jax.devices()[:1]))


@pytest.mark.parametrize("prm,mesh", [((4, 2, 8), {"fsdp": 2}), ((2, 1, 2), {"data": 4})])
def test_bubbles_filled_with_nan_leak_nothing(prm, mesh, corpus, reference):
    """Stages that wait for their first micro-batch, or idle after their last, start from NaN here."""
    assert_same_gradients(loss_and_grads(pipelined(*prm, **mesh), corpus, jax.devices(), bubble_value=np.nan),
                          reference)


@pytest.fixture(scope="module")
def plain_run(corpus):
    cfg = plain()
    cfg.train.microbatches = 2
    return run_steps(cfg, corpus, jax.devices()[:1], steps=2)


@pytest.mark.parametrize("prm,mesh,zero_stage,sequence_parallel,remat,schedule", [
    ((4, 2, 4), {"fsdp": 2}, 3, False, "full", "gpipe"),
    # data replicas' vmap around the stages' around agx's vocab-parallel lookup: refused by JAX's
    # check on the newest stack until the lookup's shard_map ran unchecked
    ((2, 1, 2), {"data": 2, "tensor": 2}, 1, True, "selective", "gpipe"),
    ((4, 1, 4), {"data": 2}, 2, False, "full", "1f1b"),
])
def test_training_steps_with_accumulation_and_remat_match_the_plain_model(prm, mesh, zero_stage, sequence_parallel,
                                                                          remat, schedule, corpus, plain_run):
    cfg = pipelined(*prm, zero_stage=zero_stage, sequence_parallel=sequence_parallel, schedule=schedule, **mesh)
    cfg.train.microbatches, cfg.model.remat = 2, remat
    assert_same_run(run_steps(cfg, corpus, jax.devices(), steps=2), plain_run)


def _mlp_pipeline_temp_bytes(policy) -> tuple[int, dict]:
    """Temp memory of grad(loss) through the pipeline for a stack of MLP layers, and the gradients."""
    mesh = build_mesh(tiny_config(pipeline=4, data=2).mesh, jax.devices())
    layout = Layout(mesh, logical_rules(False, False, True))
    L, D, F, B, T = 8, 64, 256, 64, 128
    schedule = pipeline.Schedule(stages=4, microbatches=16, repeats=1)
    logical = {"w_in": jax.sharding.PartitionSpec("layers", "embed", "mlp"),
               "w_out": jax.sharding.PartitionSpec("layers", "mlp", "embed")}

    def layers(stack, x_BxTxD, rng):
        layer = lambda x, w: (x + jnp.tanh(x @ w["w_in"]) @ w["w_out"], None)
        return jax.lax.scan(layer, x_BxTxD, stack)[0]

    def loss(stack, x_BxTxD):
        x_PxnxTxD = row_groups(x_BxTxD, 4, 1)
        return jnp.mean(pipeline.run(layers, stack, logical, x_PxnxTxD, schedule, layout.constrain, policy=policy) ** 2)

    keys = jax.random.split(jax.random.key(0), 3)
    stack = {"w_in": jax.random.normal(keys[0], (L, D, F)) / 8, "w_out": jax.random.normal(keys[1], (L, F, D)) / 16}
    x = jax.random.normal(keys[2], (B, T, D))
    shardings = ({k: layout.sharding(tuple(v)) for k, v in logical.items()}, layout.sharding(("batch", None, None)))
    grad = jax.jit(jax.grad(loss), in_shardings=shardings)
    temp = grad.lower(stack, x).compile().memory_analysis().temp_size_in_bytes
    want = jax.grad(lambda s, x: jnp.mean(layers(s, x, None) ** 2))(stack, x)
    return temp, jax.tree_util.tree_map(lambda g, w: float(np.linalg.norm(g - w) / np.linalg.norm(w)), grad(stack, x), want)


def test_keeping_only_stage_inputs_takes_less_memory_than_plain_remat():
    named, named_errors = _mlp_pipeline_temp_bytes(pipeline.SAVE_STAGE_INPUTS)
    plain_remat, plain_errors = _mlp_pipeline_temp_bytes(None)
    assert max(named_errors.values()) < 1e-5 and max(plain_errors.values()) < 1e-5
    # Plain remat keeps each iteration's whole carry: the stage outputs and the micro-batch buffer
    # (M/P = 4 micro-batches), five micro-batches an iteration against one: 4 more in each of 19.
    micro_batch = 64 // 16 // 2 * 128 * 64 * 4  # rows per data shard × T × D × float32
    print(f"temp bytes per device: stage inputs {named}, plain remat {plain_remat} ({plain_remat / named:.2f}x)")
    assert plain_remat - named == pytest.approx(4 * 19 * micro_batch, rel=0.1)
    assert named < 0.5 * plain_remat


def _step_temp_bytes(schedule: str) -> int:
    cfg = pipelined(4, 1, 32, data=2, schedule=schedule)
    cfg.model.d_model, cfg.model.seq_len, cfg.train.batch_size = 128, 128, 64
    return compile_step(cfg, jax.devices()).memory["temporaries"]


def test_one_f_one_b_keeps_fewer_stage_inputs_than_gpipe():
    """With M = 32 micro-batches on 4 stages, GPipe keeps 35 stage inputs a device, 1F1B at most 7."""
    gpipe, one_f_one_b = _step_temp_bytes("gpipe"), _step_temp_bytes("1f1b")
    print(f"compiled temp bytes per device: gpipe {gpipe}, 1f1b {one_f_one_b} ({one_f_one_b / gpipe:.2f}x)")
    assert one_f_one_b < 0.85 * gpipe


@pytest.mark.parametrize("schedule,sent", [("gpipe", 2), ("1f1b", 1)])
def test_stages_pass_activations_by_collective_permute_in_the_loop(schedule, sent):
    """GPipe: forward and backward, every iteration, the stage outputs and the micro-batch buffer
    (here one micro-batch). 1F1B: every tick, the forward outputs onward and the gradients back."""
    cfg = pipelined(4, 1, 4, data=2, schedule=schedule)
    compiled = compile_step(cfg, jax.devices())
    loop = pipeline_schedule(cfg, {"pipeline": 4, "data": 2, "fsdp": 1, "context": 1, "tensor": 1})
    permutes = compiled.collectives["collective-permute"]
    assert permutes["count"] >= 2 * sent * loop.iterations
    micro_batch = cfg.train.batch_size // loop.microbatches // 2 * cfg.model.seq_len * cfg.model.d_model * 4
    assert permutes["bytes"] >= 2 * sent * loop.iterations * micro_batch


def test_no_pipeline_no_collective_permute():
    assert "collective-permute" not in compile_step(tiny_config(data=8), jax.devices()).collectives


@pytest.mark.parametrize("settings,message", [
    (["model.num_layers=6"], "model.num_layers=6 is not divisible by mesh.pipeline × pipeline.repeats = 4×1"),
    (["pipeline.microbatches=6"], "pipeline.microbatches=6 is not a multiple of mesh.pipeline=4"),
    (["pipeline.microbatches=2", "pipeline.repeats=2"], "pipeline.microbatches=2 is less than "
     "mesh.pipeline=4: the circular schedule"),
    (["pipeline.schedule=1f1b", "pipeline.repeats=2"], "pipeline.schedule=1f1b takes "
     "pipeline.repeats=1 and model.dropout=0"),
    (["pipeline.schedule=interleaved"], "pipeline.schedule='interleaved' is not one of gpipe, 1f1b"),
])
def test_pipelines_that_cannot_run_get_one_line(settings, message):
    result = agx_train(*TINY, "--dry-run", *sets("mesh.pipeline=4", "mesh.data=2", "model.num_layers=8", *settings),
                       env=env_for(8))
    assert result.returncode == 2
    assert message in one_error_line(result)


def test_dry_run_reports_the_schedule_and_activation_memory():
    """Set by the keys' old names, which still work, each with a one-line notice."""
    result = agx_train(*TINY, "--dry-run", *sets("mesh.pipeline=4", "mesh.data=2", "model.num_layers=8",
                                                 "model.pipeline_repeats=2", "train.pipeline_microbatches=4"),
                       env=env_for(8))
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("agx: note: ")]
    assert notices == ["agx: note: model.pipeline_repeats is now pipeline.repeats; the old name still works, for now",
                       "agx: note: train.pipeline_microbatches is now pipeline.microbatches; the old name still "
                       "works, for now"]
    import json

    plan = json.loads(result.stdout.splitlines()[-1])
    assert plan["mesh"] == {"pipeline": 4, "data": 2, "fsdp": 1, "context": 1, "tensor": 1}
    assert plan["pipeline"] == {"schedule": "circular", "stages": 4, "microbatches": 4, "repeats": 2,
                                "bubble_fraction": round(3 / 11, 4)}
    assert plan["activation_bytes_per_device"] > 0


@pytest.mark.slow  # a long launched run (see pyproject.toml)
def test_checkpoints_move_between_pipelined_and_plain_layouts(tmp_path):
    """Four stages to none and back: the resumed runs continue the uninterrupted one."""
    common = [*TINY, *sets("model.num_layers=8", "checkpoint.every=3", "checkpoint.async_save=false")]
    staged = sets("mesh.pipeline=4", "mesh.data=2", "pipeline.microbatches=8")
    flat = sets("mesh.pipeline=1", "mesh.data=8")
    first = tmp_path / "pipelined"
    result = agx_train(*common, "--workdir", str(first), *staged, *sets("train.steps=9"), env=env_for(8))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agx: pipeline: gpipe schedule, 4 stages, 8 micro-batches, 1 repeat(s): bubble 27.3%" in result.stdout
    uninterrupted = records(first)

    second = tmp_path / "moved"
    shutil.copytree(first / "checkpoints", second / "checkpoints")
    for step in ("6", "9"):
        shutil.rmtree(second / "checkpoints" / step)
    result = agx_train(*common, "--workdir", str(second), *flat, *sets("train.steps=6"), env=env_for(8))
    assert result.returncode == 0, result.stderr[-3000:]
    result = agx_train(*common, "--workdir", str(second), *staged, *sets("train.steps=9"), env=env_for(8))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = records(second)
    assert sorted(resumed) == [4, 5, 6, 7, 8, 9]
    for step, record in resumed.items():
        for key in ("loss", "grad_norm", "lr"):
            assert record[key] == pytest.approx(uninterrupted[step][key], rel=1e-5), (step, key)
