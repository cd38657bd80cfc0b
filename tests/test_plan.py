"""The planner: collective bytes read from the compiled HLO against the analytic minimum, planned
memory against the arrays a real run allocates and against XLA's analysis for every GPT-3 size,
the trillion-parameter plans on 32 and 64 Aurora nodes, AuroraGPT-70B on 8, the search's CSV and plot, and
bad input."""

import csv
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import CLI_ENV

from agx.config import load_experiment
from agx.models.sizes import param_count
from agx.parallel.mesh import AXES
from agx.planning import analytic
from agx.planning import canonical as canonical_layouts
from agx.planning.compiled import compile_step
from agx.training.loop import Trainer
from agx.training.step import pipeline_schedule

SMALL = ["model.num_layers=2", "model.d_model=256", "model.num_heads=8", "model.seq_len=128", "model.vocab_size=1024",
         "train.batch_size=16", "model.dtype=float32", "model.scan_unroll=1"]  # a loop over layers: trip counts count
MiB = 2**20


def small(*mesh):
    return load_experiment("gpt3_tiny", SMALL + list(mesh))


def both(cfg):
    shapes = analytic.StateShapes(cfg)
    compiled = compile_step(cfg)
    shape = {axis: getattr(cfg.mesh, axis) for axis in AXES}
    return analytic.collective_bytes(cfg, shapes, shape, pipeline_schedule(cfg, shape)), compiled.collectives, shapes


@functools.cache
def canonical(name: str) -> canonical_layouts.Measured:
    """A canonical layout of the README's collectives table, compiled once a module: the table's
    test and the tests below that read one of its layouts share it."""
    return canonical_layouts.measure(*canonical_layouts.LAYOUTS[name])


def test_every_canonical_layout_moves_the_minimum_of_each_collective_kind_as_the_readme_says():
    """Each canonical layout's compiled bytes of each kind of collective are at most 1.1x their
    analytic minimum (the issue's bar), and at least 0.95x of it: a minimum above what the compiler
    found is a wrong minimum. Both up to 512 bytes: the loss and the gradient norm's partial sums,
    which the minimum leaves out. And they are what the README's table for this stack (newest or
    xpu) gives, within 1% or 0.01 MiB."""
    stack = "xpu" if jax.__version__ == "0.5.0" else "newest"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split(f"<!-- collectives table, {stack} stack -->")[1].split("<!-- end of table -->")[0]
    documented = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("| \n").split("|")]
                                                    for line in table.strip().splitlines()[2:])}
    assert list(documented) == list(canonical_layouts.LAYOUTS)
    numbers = lambda cells: [float(n) for cell in cells for n in cell.rstrip("×").split(" / ")]
    scalars = 512
    for name in canonical_layouts.LAYOUTS:
        layout = canonical(name)
        minimum = canonical_layouts.minimum_by_kind(layout.minimum)
        for kind in canonical_layouts.KINDS:
            compiled = layout.compiled.get(kind, {"bytes": 0})["bytes"]
            assert 0.95 * minimum[kind] - scalars <= compiled <= 1.1 * minimum[kind] + scalars, (name, kind, minimum)
        row = layout.row(name)
        assert numbers(documented[name]) == pytest.approx(numbers(row[1:]), rel=0.01, abs=0.01), (name, row)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_data_replicas_reduce_the_gradients_once_a_step_at_the_minimum(zero_stage):
    """Four micro-batches: the replicas' gradients are summed once, after the accumulation loop, by
    an all-reduce (ZeRO-0) or a reduce-scatter onto the optimizer's shards and an all-gather of the
    updated weights (ZeRO-1). Nothing is reduced inside the loop."""
    if zero_stage == 1:
        layout = canonical("data=8, ZeRO-1, 4 micro-batches")
        minimum, compiled = layout.minimum, layout.compiled
    else:
        minimum, compiled, _ = both(small("mesh.data=8", "mesh.zero_stage=0", "train.microbatches=4",
                                          "train.batch_size=32"))
    scalars = 64  # the loss and the gradient norm's partial sums, as all-reduces
    if zero_stage == 0:
        assert set(compiled) == {"all-reduce"}
        assert minimum["gradient reduction"] <= compiled["all-reduce"]["bytes"] <= minimum["gradient reduction"] + scalars * 8
    else:
        reduced = compiled["reduce-scatter"]["bytes"] + compiled["all-reduce"]["bytes"]  # biases: all-reduced
        assert minimum["gradient reduction"] <= reduced <= minimum["gradient reduction"] + scalars * 8
        assert compiled["all-gather"]["bytes"] == pytest.approx(minimum["updated-weight all-gather"], rel=0.001)
    assert all(c["in_loops"] == 0 for c in compiled.values()), compiled


@pytest.mark.parametrize("mesh", [("mesh.data=2", "mesh.fsdp=4", "mesh.zero_stage=2"),
                                  ("mesh.data=8", "mesh.zero_stage=3")])
def test_zero_2_and_zero_3_over_data_reduce_scatter_each_micro_batch_onto_the_gradients_shards(mesh):
    """ZeRO-2 keeps the weights whole over `data` and shards their gradients over it: the backward
    reduce-scatters each micro-batch's gradients straight onto the gradient's shards (it had
    reduce-scattered them onto the weight's and all-reduced over `data`: 1.17x and 1.81x at data=8).
    ZeRO-3 over `data` alone (fsdp=1) gathers the weights outside the layers into one copy a device,
    as over `fsdp` (it had gathered the head's weights twice: 1.06x). Each kind at 1.1x its minimum
    at most and 0.95x at least, as the canonical layouts."""
    minimum, compiled, _ = both(small(*mesh, "train.microbatches=2"))
    minimum = canonical_layouts.minimum_by_kind(minimum)
    for kind in canonical_layouts.KINDS:
        moved = compiled.get(kind, {"bytes": 0})["bytes"]
        assert 0.95 * minimum[kind] - 512 <= moved <= 1.1 * minimum[kind] + 512, (kind, moved, minimum)
    assert compiled["reduce-scatter"]["in_loops"] == compiled["reduce-scatter"]["bytes"]  # each micro-batch's


PIPELINES = {
    "GPipe, data=2 × fsdp=2, ZeRO-3": ("gpt3_tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.zero_stage=3"]),
    "1F1B, data=2 × fsdp=2, ZeRO-3": ("gpt3_tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.zero_stage=3",
                                                   "pipeline.schedule=1f1b"]),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipelines_move_their_minimum_which_counts_what_the_stage_recompute_moves_again(name):
    """2 stages of 2 layers. Each loop iteration (1F1B: tick) recomputes a stage from its kept input,
    so it gathers a stage's sharded weights three times (forward, recompute, backward); the layers'
    gradients are reduced every iteration, bubbles included. The minimum counts them so (it counted
    two gathers: 1.5x the minimum's all-gathers). 1F1B's stages each run the embedding and the head
    on their own copy, one a device, reduced once (each tick's gradient of them was all-reduced:
    26x the minimum's all-reduces at fsdp=4). Each kind at 1.1x its minimum at most and 0.95x at
    least; not all-to-alls: jax 0.5.0 moves 0.1-0.3 MiB of activations so (the newest, none),
    which the minimum does not count."""
    experiment, settings = PIPELINES[name]
    cfg = load_experiment(experiment, SMALL + ["model.num_layers=4", "mesh.pipeline=2", "pipeline.microbatches=4",
                                               *settings])
    minimum, compiled, _ = both(cfg)
    minimum = canonical_layouts.minimum_by_kind(minimum)
    for kind in ("all-gather", "reduce-scatter", "all-reduce", "collective-permute"):
        moved = compiled.get(kind, {"bytes": 0})["bytes"]
        assert 0.95 * minimum[kind] - 512 <= moved <= 1.1 * minimum[kind] + 512, (kind, moved, minimum)


def test_fsdp_and_sequence_parallel_reductions_are_reduce_scatters_on_a_backend_that_forms_none():
    """XLA's CPU backend turns no all-reduce into a reduce-scatter, so these are agx's own
    (agx.parallel.weight_gradient, .sequence, .vocab). FSDP: each micro-batch's weight gradients
    are reduce-scattered, the tied embedding's once (its lookup and head add into one copy a
    device); all-reduces move only what `fsdp` does not shard (biases without an `embed` axis) and
    the loss; the lookup moves no all-to-all. Sequence parallelism: an all-gather and a
    reduce-scatter for each of Megatron's all-reduces."""
    fsdp = canonical("fsdp=8, 4 micro-batches")
    minimum, compiled = canonical_layouts.minimum_by_kind(fsdp.minimum), fsdp.compiled
    assert compiled["all-gather"]["bytes"] == pytest.approx(minimum["all-gather"], rel=0.01)
    assert compiled["reduce-scatter"]["bytes"] == pytest.approx(minimum["reduce-scatter"], rel=0.001)
    assert 0 < fsdp.minimum["gradient all-reduce"] <= compiled["all-reduce"]["bytes"] <= fsdp.minimum[
        "gradient all-reduce"] + 512
    assert set(compiled) == {"all-gather", "reduce-scatter", "all-reduce"}
    sequence_parallel = canonical("tensor=8, sequence parallel")
    minimum = canonical_layouts.minimum_by_kind(sequence_parallel.minimum)
    compiled = sequence_parallel.compiled
    for kind in ("all-gather", "reduce-scatter"):
        assert compiled[kind]["bytes"] == pytest.approx(minimum[kind], rel=0.01), kind
    # What is left whole: the vocab-parallel cross-entropy's per-token maximum and sums ([B, T]
    # each, as Megatron's), the loss and the gradient norm
    tokens = sequence_parallel.cfg.train.batch_size * sequence_parallel.cfg.model.seq_len
    assert compiled["all-reduce"]["bytes"] <= 4 * tokens * 4 * 2


def test_a_collective_counts_at_the_width_the_program_gave_it():
    """XLA's CPU compiler widens every bf16 collective to f32; the count takes the program's width:
    a bf16 all-gather and reduce-scatter move half an f32 program's bytes, and a reduction the
    program itself writes in f32 counts at f32. Compiled on this stack, whose HLO is counted."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh, PartitionSpec

    from agx.compat import shard_map
    from agx.planning.compiled import collectives_in

    mesh = Mesh(mesh_utils.create_device_mesh((8,)), ("t",))

    def moved(dtype, reduce_in=None):
        def local(x):
            y = jnp.sin(jax.lax.all_gather(x.astype(dtype), "t", axis=0, tiled=True))
            return jax.lax.psum_scatter(y if reduce_in is None else y.astype(reduce_in), "t", tiled=True)
        step = jax.jit(shard_map(local, mesh, in_specs=(PartitionSpec("t"),), out_specs=PartitionSpec("t")))
        hlo = step.lower(jnp.ones((64, 16), jnp.float32)).compile().as_text()
        return {kind: c["bytes"] for kind, c in collectives_in(hlo, 8).items()}

    f32 = 64 * 16 * 4 * 7 // 8  # the gathered result, and the reduced operand, each moved 7/8
    assert moved(jnp.float32) == {"all-gather": f32, "reduce-scatter": f32}
    assert moved(jnp.bfloat16) == {"all-gather": f32 // 2, "reduce-scatter": f32 // 2}
    assert moved(jnp.bfloat16, reduce_in=jnp.float32) == {"all-gather": f32 // 2, "reduce-scatter": f32}


def test_tensor_parallel_all_reduces_are_megatrons():
    minimum, compiled, _ = both(small("mesh.data=1", "mesh.tensor=8"))
    assert set(compiled) == {"all-reduce"}
    assert compiled["all-reduce"]["bytes"] == pytest.approx(minimum["tensor-parallel all-reduce"], rel=0.01)


@pytest.mark.parametrize("tensor", [2, 8])
def test_grouped_query_attentions_tensor_parallel_traffic_is_at_the_minimum(tensor):
    """Llama's 8 query heads on 2 KV heads. At tensor=2 (× data=4, ZeRO-1) the KV heads split with
    their query heads: Megatron's activation all-reduces and no more. At tensor=8 they are whole on
    every rank, and the backward adds what the planner counts for that: each KV head's gradient
    summed over the 4 ranks that share it, then gathered whole."""
    layout = canonical(f"Llama GQA (8 heads, 2 KV), tensor={tensor}" + (" × data=4" if tensor == 2 else ""))
    minimum = canonical_layouts.minimum_by_kind(layout.minimum)
    assert set(layout.compiled) <= {"all-reduce", "all-gather", "reduce-scatter"}, layout.compiled
    for kind, compiled in layout.compiled.items():  # the all-reduces with the softmax's [B, T] pairs
        assert compiled["bytes"] == pytest.approx(minimum[kind], rel=0.01), kind
    assert ("KV-gradient all-gather" in layout.minimum) == (tensor == 8)


def test_pipeline_sends_are_what_the_compiled_step_permutes_and_its_loop_reduces_no_gradient():
    """Forward and backward, every iteration: the stage outputs and the micro-batch buffer. The
    stage weights' gradients over `data` (ZeRO-1) are reduce-scattered once, after the loop; those
    of the embedding and the LM head, which every stage runs on its rows, are all-reduced over the
    stages once, after it too."""
    layout = canonical("pipeline=4 × data=2, GPipe, 8 micro-batches")
    minimum, compiled = layout.minimum, layout.compiled
    assert compiled["collective-permute"]["bytes"] == pytest.approx(minimum["pipeline send/receive"], rel=0.1)
    assert compiled["all-reduce"]["in_loops"] == 0 and compiled["reduce-scatter"]["in_loops"] == 0
    scalars = 64  # the loss and the gradient norm's partial sums ride along
    reduced = compiled["reduce-scatter"]["bytes"] + compiled["all-reduce"]["bytes"]  # biases over data: all-reduced
    stages = minimum["embedding and LM-head gradient all-reduce"]
    assert 0 <= reduced - minimum["gradient reduction"] - stages <= scalars * 8


@pytest.mark.parametrize("mesh", [("mesh.data=1", "mesh.fsdp=8"), ("mesh.data=8", "mesh.zero_stage=1"),
                                  ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.zero_stage=3")])
def test_planned_state_memory_is_what_a_real_run_allocates(mesh):
    cfg = small(*mesh)
    shape = {axis: getattr(cfg.mesh, axis) for axis in AXES}
    planned = analytic.memory(cfg, analytic.StateShapes(cfg), shape, pipeline_schedule(cfg, shape))
    state = Trainer.build(cfg).init()
    for part in ("params", "opt_state"):
        allocated = [sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(getattr(state, part))
                         for s in leaf.addressable_shards if s.device == device) for device in jax.devices()]
        assert allocated == [planned[part]] * 8, part
    scalars = 2 * 4  # step and bad_steps
    tokens = cfg.train.batch_size // (cfg.mesh.data * cfg.mesh.fsdp) * (cfg.model.seq_len + 1) * 4
    assert compile_step(cfg).memory["arguments"] == planned["params"] + planned["opt_state"] + scalars + tokens


SIZES = ["gpt3_small", "gpt3_medium", "gpt3_large", "gpt3_xl", "gpt3_2_7b", "gpt3_6_7b", "gpt3_13b", "gpt3_175b"]
MARGIN = 0.30  # analytic within 30% of XLA's CPU analysis (measured 0.83-0.93 of it on jax 0.10, 0.72-0.98 on 0.5)


@pytest.mark.slow  # the planner compiling full-size steps (see pyproject.toml)
@pytest.mark.parametrize("name", SIZES)
def test_analytic_memory_is_within_the_margin_of_the_compiled_step(name):
    """Each size at its published shape (2048 tokens, bf16, selective remat), one sequence per device,
    on two layouts of 8 simulated devices."""
    ratios = []
    for mesh in (["mesh.data=1", "mesh.fsdp=8"], ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                                                   "mesh.sequence_parallel=true"]):
        cfg = load_experiment(name, ["train.batch_size=8", "model.attention=xla", *mesh])  # dense, as measured
        shape = {"pipeline": 1, "data": 1, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
        planned = analytic.memory(cfg, analytic.StateShapes(cfg), shape, None)["total"]  # no stages
        ratios.append(planned / compile_step(cfg).memory["total"])
    print(name, [round(r, 3) for r in ratios])
    assert all(1 - MARGIN <= r <= 1 + MARGIN for r in ratios), ratios


def test_blocked_attention_saves_activation_memory_in_the_planned_proportion():
    """gpt3_small without remat keeps every layer's scores; blocks of C of 2048 keep (1 + C/T)/2 of
    them. The compiled step's savings at C = 512 and 1024 stand near the planned proportion, 3 : 2:
    1.57 before the layers' matmuls were written out (agx.parallel.weight_gradient), 1.28 since,
    where XLA's schedule peaks 0.25 GB higher with 4 blocks. (The absolute saving compiles 1.56x the
    analytic one: agx's softmax is fp32, Korthikanti's 5·a·s/h is for 16-bit scores.)"""
    planned, compiled = {}, {}
    for block in (0, 512, 1024):
        cfg = load_experiment("gpt3_small", ["train.batch_size=8", "mesh.data=1", "mesh.fsdp=8", "model.remat=none",
                                             "model.attention=xla", f"model.attention_block={block}"])
        shape = {"pipeline": 1, "data": 1, "fsdp": 8, "context": 1, "tensor": 1}
        planned[block] = analytic.activation_bytes(cfg, shape, None)
        compiled[block] = compile_step(cfg).memory["total"]
    saving_ratio = lambda totals: (totals[0] - totals[512]) / (totals[0] - totals[1024])
    assert saving_ratio(planned) == pytest.approx(1.5, rel=1e-6)
    assert saving_ratio(compiled) == pytest.approx(1.5, rel=0.2), compiled


def plan_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agx.plan", *args], capture_output=True, text=True, env=CLI_ENV,
                          timeout=timeout)


def trillion(nodes: int, *settings: str) -> list[str]:
    return ["--experiment", "gpt3_1t", "--system", "aurora", "--nodes", str(nodes)] + [
        a for s in ("mesh.data=1", "mesh.zero_stage=3", "mesh.sequence_parallel=true", "model.remat=full", *settings)
        for a in ("--set", s)]


def planned(out: str) -> tuple[float, float, dict]:
    """agx.plan's analytic and compiled total GiB, and its compiled and minimum GiB by collective kind."""
    total = next(line for line in out.splitlines() if line.strip().startswith("total")).split()
    section = out.split("and the minimum by kind:")[1].splitlines()[1:]
    section = section[:next(i for i, line in enumerate(section) if line.split()[0] == "total") + 1]
    gib = {line.split()[0]: [float(n.replace(",", "")) for n in re.findall(r"([\d,.]+) GiB", line)] for line in section}
    return float(total[1]), float(total[3]), gib


def assert_at_the_minimum(gib: dict):
    """Gathers and reduce-scatters within 1.2x of the minimum (the issue's bar for the trillion), and
    not below it (the minimum's floor); all-reduces only of biases and norms."""
    assert set(gib) == {"all-gather", "reduce-scatter", "all-reduce", "total"}, gib
    for kind in ("all-gather", "reduce-scatter", "total"):
        compiled, minimum = gib[kind]
        assert 0.999 * minimum <= compiled <= 1.2 * minimum, (kind, gib)
    assert gib["all-reduce"][0] <= 1e-3 * gib["total"][0], gib


@pytest.mark.slow
def test_the_trillion_fits_on_32_aurora_nodes_every_tile_at_the_minimum_planned_in_under_a_minute():
    """fsdp=48 × tensor=8 on all 384 tiles of 32 nodes, as Megatron-DeepSpeed could not: d_model
    25600 over 48 is stored padded (25632), and the padded weights are gathered and their gradients
    reduce-scattered as unpadded ones' (agx.parallel.weight_gradient), each layer's gradient added
    into the sum in the backward (agx.training.accumulation). Measured 57.6 GiB compiled against 55.0
    analytic, 1.00x the minimum of each kind; 71.3 GiB and 29,434 GiB of all-reduces before."""
    started = time.perf_counter()
    result = plan_cli(*trillion(32, "mesh.fsdp=48", "mesh.tensor=8", "train.microbatches=16"))
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fits in 64 GiB: yes (compiled figure)" in result.stdout and "compiled on 384 devices" in result.stdout
    analytic_gib, compiled_gib, gib = planned(result.stdout)
    assert analytic_gib <= compiled_gib <= 1.15 * analytic_gib < 64, (analytic_gib, compiled_gib)
    assert_at_the_minimum(gib)
    assert elapsed < 60, elapsed


@pytest.mark.slow
def test_the_trillions_compiled_step_moves_at_most_the_minimum_and_a_fifth_in_the_memory_planned():
    """The layout of the "every byte" issue, fsdp=64 × tensor=8 on 64 Aurora nodes' 512 tiles.
    Weight gathers in bf16, gradients reduce-scattered in f32 each micro-batch, and sequence
    parallelism's gathers and reduce-scatters, with the full recompute's: each kind and the total
    within 1.2x of the analytic minimum (measured 1.00x), and none below it (the minimum's floor).
    Memory: the compiled step within 1.15x of the analytic figure (measured 1.06x on jax 0.10, 1.12x
    on 0.5), and not below it: 62.6 GiB before the optimizer ran in place, the layers' gradients were
    summed in the backward (agx.training.accumulation) and the row-parallel weights gathered along
    their outer dimension (agx.parallel.weight_gradient)."""
    result = plan_cli(*trillion(64, "mesh.fsdp=64", "mesh.tensor=8", "train.microbatches=16"))
    assert result.returncode == 0, result.stderr[-3000:]
    analytic_gib, compiled_gib, gib = planned(result.stdout)
    assert analytic_gib <= compiled_gib <= 1.15 * analytic_gib, (analytic_gib, compiled_gib)
    assert_at_the_minimum(gib)


# The planner's analytic figures, compiling nothing, are arithmetic on the model's shapes (one
# jax.eval_shape of its init): the same on both stacks, so the tests of them alone run on the newest.
ANALYTIC_ONLY = pytest.mark.stack_independent


@ANALYTIC_ONLY
def test_the_trillions_own_mesh_takes_all_768_tiles_of_64_aurora_nodes_padding_its_weights():
    """fsdp=-1 on 64 nodes is fsdp=768, which divides no dimension of the model (25600 = 2^10·5^2):
    each weight is stored padded (d_model to 26112, 2% more), and the planner counts the padded
    bytes. (The QKV and MLP biases, 1.8% of the figure, are whole on every device at tensor=1.)"""
    result = plan_cli("--experiment", "gpt3_1t", "--system", "aurora", "--nodes", "64", "--no-compile")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh {'pipeline': 1, 'data': 1, 'fsdp': 768, 'context': 1, 'tensor': 1}" in result.stdout
    params_gib = float(next(line for line in result.stdout.splitlines() if line.strip().startswith("params")).split()[1])
    logical_gib = 4 * param_count(load_experiment("gpt3_1t", []).model) / 768 / 2**30
    assert logical_gib * 26112 / 25600 < params_gib < logical_gib * 1.05, (params_gib, logical_gib)


def search(tmp_path, *args):
    """`agx.plan ARGS --search --no-compile --output tmp_path`: the finished process and the CSV's rows."""
    result = plan_cli(*args, "--search", "--no-compile", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, list(csv.DictReader(open(tmp_path / "search.csv")))


@pytest.mark.slow
@ANALYTIC_ONLY
def test_the_search_ranges_over_pipeline_stages_for_the_trillion_on_aurora(tmp_path):
    result, rows = search(tmp_path, "--experiment", "gpt3_1t", "--system", "aurora", "--nodes", "64")
    staged = [r for r in rows if int(r["pipeline"]) > 1]
    assert {int(r["pipeline"]) for r in staged} >= {2, 4, 8, 16, 32, 64, 128}
    assert {r["repeats"] for r in staged} == {"1", "2"} and all(int(r["pipeline_microbatches"]) > 0 for r in staged)
    verdict = result.stdout.splitlines()[-2]
    assert verdict.startswith("pipeline: with pipeline stages: least memory") and "Pipeline layouts" in verdict
    least = lambda group: min(float(r["analytic_gib"]) for r in group)
    claim = "beat them on memory" if least(staged) < least([r for r in rows if r["pipeline"] == "1"]) else \
        "do not beat them on memory"
    assert claim in verdict


def aurora_70b(*settings):
    return ["--experiment", "auroragpt_70b", "--system", "aurora", "--nodes", "8"] + [
        a for s in settings for a in ("--set", s)]


def compiled_gib(out: str) -> float:
    return float(next(line for line in out.splitlines() if line.strip().startswith("total")).split()[3])


@pytest.mark.slow
def test_auroragpt_70b_on_8_aurora_nodes_is_out_of_memory_with_pp8_tp1_and_the_search_shows_what_fits(tmp_path):
    """Megatron-DeepSpeed's layout: 8 pipeline stages, no tensor parallelism, ZeRO-1 over data (its
    pipeline engine allows no higher stage). A stage's weights and gradients alone exceed a tile."""
    megatron = plan_cli(*aurora_70b("mesh.pipeline=8", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1",
                                    "mesh.zero_stage=1", "pipeline.microbatches=64", "model.remat=full"))
    assert megatron.returncode == 0, megatron.stderr[-3000:]
    assert "fits in 64 GiB: NO (compiled figure)" in megatron.stdout
    gib = {line.split()[0]: float(line.split()[1]) for line in megatron.stdout.splitlines()
           if line.strip().startswith(("params", "grads"))}
    assert gib["params"] + gib["grads"] > 64 and compiled_gib(megatron.stdout) > 64

    _, rows = search(tmp_path, *aurora_70b())
    pp8_tp1 = [r for r in rows if (r["pipeline"], r["tensor"]) == ("8", "1")]
    deepspeed_allows = [r for r in pp8_tp1 if int(r["zero"]) <= 1 and r["fsdp"] == "1"]
    assert deepspeed_allows and not any(r["fits"] == "True" for r in deepspeed_allows)
    assert any(r["fits"] == "True" for r in pp8_tp1 if r["zero"] == "3")  # agx shards the stage's weights too

    # The fastest pipelined layout with half the memory to spare by the analytic figure (XLA's CPU
    # analysis keeps 15-25 GiB more temporaries at this size), compiled: it fits
    best = min((r for r in rows if r["fits"] == "True" and r["pipeline"] != "1" and float(r["analytic_gib"]) < 32),
               key=lambda r: float(r["step_s"]))
    fits = plan_cli(*aurora_70b(*(f"mesh.{axis}={best[axis]}" for axis in AXES), f"mesh.zero_stage={best['zero']}",
                                f"model.remat={best['remat']}", f"train.microbatches={best['microbatches']}",
                                f"mesh.sequence_parallel={best['sequence_parallel']}",
                                *([f"pipeline.microbatches={best['pipeline_microbatches']}",
                                   f"pipeline.repeats={best['repeats']}"] if best["pipeline"] != "1" else [])))
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert "fits in 64 GiB: yes (compiled figure)" in fits.stdout, fits.stdout


@pytest.mark.slow
@ANALYTIC_ONLY
def test_long_sequences_fit_with_the_context_axis_where_whole_ones_do_not(tmp_path):
    """AuroraGPT-7B at 128k positions on 16 Aurora nodes: the search finds no layout that fits with
    whole sequences on each device, and layouts that do with each split over `context` (4 or more).
    At 32k the experiment's own ZeRO-3 data-parallel layout (selective recompute) fits 16 nodes only
    with its sequences split: one whole 32k sequence a device is 249 GiB, one eighth of one 42 GiB."""
    _, rows = search(tmp_path, "--experiment", "auroragpt_7b_128k", "--system", "aurora", "--nodes", "16")
    fits = lambda row: row["fits"] == "True"
    assert not [r for r in rows if r["context"] == "1" and fits(r)]
    assert {int(r["context"]) for r in rows if fits(r)} and min(int(r["context"]) for r in rows if fits(r)) >= 4
    common = ("--experiment", "auroragpt_7b_32k", "--system", "aurora", "--nodes", "16", "--no-compile", "--set")
    whole = plan_cli(*common, "mesh.fsdp=128", "mesh.context=1")
    split = plan_cli(*common, "mesh.fsdp=16", "mesh.context=8", "train.microbatches=8")
    assert "fits in 64 GiB: NO" in whole.stdout and "fits in 64 GiB: yes" in split.stdout, whole.stdout + split.stdout
    assert "context K/V all-gather" in split.stdout and "context K/V all-gather" not in whole.stdout


@ANALYTIC_ONLY
def test_search_writes_a_csv_and_a_plot(tmp_path):
    _, rows = search(tmp_path, "--experiment", "gpt3_small", "--system", "h100x8", "--nodes", "1")
    assert rows and all(int(r["pipeline"]) * int(r["data"]) * int(r["fsdp"]) * int(r["tensor"]) == int(r["devices"]) for r in rows)
    fitting = [r for r in rows if r["fits"] == "True"]
    assert fitting and float(fitting[0]["analytic_gib"]) <= 80
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_more_devices_than_the_cpu_backend_simulates_compile_an_equivalent_layout_and_say_so():
    result = plan_cli("--experiment", "gpt3_tiny", "--system", "h100x8", "--nodes", "300",
                      "--set", "mesh.zero_stage=0", "--set", "train.batch_size=2400")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled on 1200 devices; equivalent to 2400: data=1200 instead of 2400" in result.stdout


def one_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("agx: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_bad_layouts_and_system_files_get_one_line(tmp_path):
    assert "do not divide" in one_error(plan_cli("--experiment", "gpt3_small", "--system", "h100x8",
                                                 "--set", "mesh.data=1", "--set", "mesh.tensor=8"))
    system = tmp_path / "mine.json"
    system.write_text(json.dumps({"devices_per_node": 4, "memory_gib": 80}))
    line = one_error(plan_cli("--experiment", "gpt3_small", "--system", str(system)))
    assert "missing system fields peak_tflops, intra_node_gbs, inter_node_gbs" in line
    figures = {"devices_per_node": 4, "memory_gib": 80, "peak_tflops": 500, "intra_node_gbs": 100, "inter_node_gbs": 25}
    system.write_text(json.dumps({**figures, "platform": "tpu"}))
    assert "platform 'tpu' is not one of cuda, rocm, xpu, cpu" in one_error(
        plan_cli("--experiment", "gpt3_small", "--system", str(system)))
    system.write_text(json.dumps({**figures, "platform": "xpu"}))  # auto plans Intel's attention there
    result = plan_cli("--experiment", "gpt3_small", "--system", str(system), "--no-compile")
    assert result.stdout.startswith("agx: attention on mine: agx's attention in query blocks of 512 of 2048 "
                                    "positions (auto on xpu: not cuDNN's, for xpu is not an NVIDIA GPU)"), result
