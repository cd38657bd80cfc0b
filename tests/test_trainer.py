"""The trainer as a user runs it (`python -m agx.train` in real processes, real Orbax checkpoints on
disk, Grain worker processes): exact resume, reshard on restore, eval, metrics, TensorBoard, the
profiler, and what happens on SIGTERM, kill -9, non-finite steps and bad workdirs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (TINY, agx_train, env_for, events, one_error_line, records, saved_steps, sets, steps_recorded,
                      wait_for)


def train(workdir, *settings, devices=8, expect=0):
    result = agx_train(*TINY, "--workdir", str(workdir), *sets(*settings), env=env_for(devices))
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# --- exact resume -----------------------------------------------------------------------------------

def test_resume_in_a_new_process_is_bit_identical_and_tensorboard_holds_each_step_once(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["optim.decay_steps=20", "checkpoint.every=5", "data.workers=1"]
    train(straight, "train.steps=20", *common)
    train(resumed, "train.steps=10", *common)
    second = train(resumed, "train.steps=20", *common)
    assert "resumed from checkpoint step 10" in second.stdout

    a, b = records(straight), records(resumed)
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        for key in ("loss", "grad_norm", "lr"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    assert saved_steps(resumed) == [10, 15, 20]  # every 5, the newest 3 kept

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(resumed / "tensorboard"))
    board.Reload()
    losses = board.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 21))
    assert [e.value for e in losses] == [np.float32(b[s]["loss"]) for s in range(1, 21)]
    assert {"train/lr", "train/grad_norm", "train/mfu", "train/tokens_per_s"} <= set(board.Tags()["scalars"])


def test_lr_schedule_and_samples_do_not_depend_on_train_steps():
    from conftest import tiny_config

    from agx.data.dataset import make_samples
    from agx.training.optimizer import lr_schedule

    short, long = tiny_config(), tiny_config()
    short.train.steps, long.train.steps = 10, 40
    short.optim.decay_steps = long.optim.decay_steps = 40
    short.optim.warmup_steps = long.optim.warmup_steps = 4
    assert [float(lr_schedule(short)(i)) for i in range(10)] == [float(lr_schedule(long)(i)) for i in range(10)]
    assert float(lr_schedule(long)(39)) == pytest.approx(short.optim.lr * short.optim.min_lr_ratio)
    a, b = make_samples(short), make_samples(long)
    assert len(a) == len(b) == 40 * short.train.batch_size
    np.testing.assert_array_equal(np.stack([a[i] for i in range(160)]), np.stack([b[i] for i in range(160)]))


# --- one base run on fsdp=8, then restored in other ways ------------------------------------------

BASE = ["mesh.data=1", "mesh.fsdp=8", "train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.batches=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    train(workdir, *BASE, "train.peak_tflops_per_device=0.01")
    return workdir


def copy_of(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("devices,mesh", [(8, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"]),
                                          (4, ["mesh.data=-1", "data.workers=2"])])
def test_restore_onto_another_mesh_continues_the_same_run(base, tmp_path, devices, mesh):
    run = copy_of(base, tmp_path)
    result = train(run, *mesh, "train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.batches=2",
                   "checkpoint.restore_step=3", devices=devices)
    assert "resumed from checkpoint step 3" in result.stdout
    assert (list((run / "set_aside").glob("*-after-step-3/6")) and
            list((run / "set_aside").glob("*-after-step-3/metrics.jsonl")))  # step 6 moved aside, not deleted
    original, restored = records(base), records(run)
    for step in (4, 5, 6):
        assert restored[step]["loss"] == pytest.approx(original[step]["loss"], rel=1e-5, abs=1e-6)
    assert restored[6]["eval_loss"] == pytest.approx(original[6]["eval_loss"], rel=1e-5)
    assert saved_steps(run) == [3, 6]


def test_eval_metrics_and_startup_times_are_recorded(base):
    from agx.config import load_experiment
    from agx.models.sizes import flops_per_token

    by_step = records(base)
    assert [s for s, r in by_step.items() if "eval_loss" in r] == [3, 6]
    for r in by_step.values():
        assert r.keys() >= {"loss", "lr", "grad_norm", "step_s", "tokens_per_s", "tokens_per_s_per_device",
                            "model_tflops_per_s_per_device", "mfu", "bad_steps", "skipped"}
        B, T = 16, 32
        assert r["tokens_per_s"] == pytest.approx(B * T / r["step_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
        model = load_experiment("gpt3_tiny", ["model.num_layers=2", "model.d_model=64", "model.seq_len=32"]).model
        assert r["model_tflops_per_s_per_device"] == pytest.approx(flops_per_token(model) * B * T / r["step_s"] / 8e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s_per_device"] / 0.01)
        if "eval_loss" in r:
            assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    (startup,) = events(base, "startup")
    assert startup["time_to_first_step_s"] > startup["compile_s"] + startup["first_step_s"] > 0
    assert startup["init_s"] > 0


def test_the_cpu_peak_is_measured_once_then_read_and_measured_again_if_unreadable(tmp_path):
    import jax

    from agx.training.metrics import CPU_PEAKS, peak_tflops_per_device

    cpu, local = jax.devices()[0], jax.local_device_count()
    measured, source = peak_tflops_per_device(cpu, "float32", None, tmp_path)
    assert measured > 0 and str(tmp_path / CPU_PEAKS) in source
    (key, value), = json.loads((tmp_path / CPU_PEAKS).read_text()).items()
    assert value / local == measured and "float32" in key
    (tmp_path / CPU_PEAKS).write_text(json.dumps({key: 123.0}))  # what the next run reads, not measures
    assert peak_tflops_per_device(cpu, "float32", None, tmp_path)[0] == 123.0 / local
    (tmp_path / CPU_PEAKS).write_text("{not json")
    again, _ = peak_tflops_per_device(cpu, "float32", None, tmp_path)
    (rewritten, stored), = json.loads((tmp_path / CPU_PEAKS).read_text()).items()
    assert again > 0 and rewritten == key and stored / local == again


def test_a_plain_orbax_user_lists_and_restores_the_arrays_without_agx(base):
    script = f"""
import orbax.checkpoint as ocp
manager = ocp.CheckpointManager({str(base / 'checkpoints')!r}, options=ocp.CheckpointManagerOptions(read_only=True))
state = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
config = manager.restore(manager.latest_step(), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
import sys, numpy
assert "agx" not in sys.modules
print(manager.all_steps(), int(state["step"]), config["name"],
      sum(numpy.asarray(x).size for x in __import__("jax").tree_util.tree_leaves(state["params"])))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env_for(8),
                            cwd=base)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[3,", "6]", "6", "gpt3_tiny", "233216"]


def test_another_experiments_checkpoints_are_refused_unless_forced(base, tmp_path):
    run = copy_of(base, tmp_path)
    refused = train(run, "name=other_experiment", "train.steps=7", expect=2)
    assert "holds checkpoints of experiment 'gpt3_tiny', not 'other_experiment'" in one_error_line(refused)
    other_shape = train(run, "model.d_model=128", "checkpoint.force=true", "train.steps=7", expect=2)
    assert "holds a different model (model.d_model: 64 there, 128 here)" in one_error_line(other_shape)
    forced = train(run, "name=other_experiment", "checkpoint.force=true", "train.steps=7")
    assert "resumed from checkpoint step 6" in forced.stdout and saved_steps(run) == [3, 6, 7]


def test_an_unreadable_checkpoint_is_set_aside_for_the_one_before(base, tmp_path):
    run = copy_of(base, tmp_path)
    for path in (run / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():  # a disk that lost the second half of every file
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = train(run, *BASE)
    warnings = [line for line in result.stdout.splitlines() if "warning: checkpoint step 6 is unreadable" in line]
    assert len(warnings) == 1, result.stdout
    assert "resumed from checkpoint step 3" in result.stdout
    assert list((run / "set_aside").glob("*-unreadable-step-6/6/state"))
    original, again = records(base), records(run)
    assert [again[s]["loss"] for s in (4, 5, 6)] == [original[s]["loss"] for s in (4, 5, 6)]
    assert saved_steps(run) == [3, 6]


def test_resume_false_starts_fresh_and_keeps_the_old_run_aside(base, tmp_path):
    run = copy_of(base, tmp_path)
    train(run, "train.steps=2", "checkpoint.every=1", "checkpoint.resume=false")
    assert sorted(records(run)) == [1, 2] and saved_steps(run) == [1, 2]
    (aside,) = (run / "set_aside").glob("*-fresh-start")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert sorted(records(aside)) == list(range(1, 7))


# --- signals, faults, kills --------------------------------------------------------------------------

def start_training(workdir, *settings):
    """A trainer in its own process group (kill -9 takes its loader workers too, as a node failure does)."""
    return subprocess.Popen([sys.executable, "-m", "agx.train", *TINY, "--workdir", str(workdir), *sets(*settings)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(8),
                            start_new_session=True)


def test_sigterm_finishes_the_step_saves_and_exits_zero_with_a_profile(tmp_path):
    process = start_training(tmp_path, "train.steps=1000", "checkpoint.every=500", "train.profile_steps=[2,3]")
    wait_for(lambda: steps_recorded(tmp_path) >= 5, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    last = max(records(tmp_path))
    assert saved_steps(tmp_path) == [last] and 5 <= last < 1000
    assert f"SIGTERM at step {last}: newest checkpoint is step {last}" in stdout
    assert events(tmp_path, "stopped")[0]["step"] == last
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_in_a_row(tmp_path):
    result = train(tmp_path, "train.steps=10", "checkpoint.every=1", "train.fault_nan_steps=[3,6,7,8]",
                   "train.max_bad_steps=3", expect=1)
    assert "3 steps in a row up to step 8 had a non-finite loss" in one_error_line(result)
    by_step = records(tmp_path)
    assert sorted(by_step) == list(range(1, 9))
    assert [by_step[s]["skipped"] for s in range(1, 9)] == [False, False, True, False, False, True, True, True]
    assert [by_step[s]["bad_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert all(math.isfinite(by_step[s]["loss"]) for s in (1, 2, 4, 5))
    # The optimizer's schedule skips with the update: step 4 takes the lr that step 3 would have had.
    assert by_step[4]["lr"] == pytest.approx(by_step[3]["lr"])
    assert saved_steps(tmp_path)[-1] == 5  # no checkpoint while the run is in a bad streak


def test_a_skipped_step_leaves_parameters_and_optimizer_state_as_they_were(corpus):
    import jax

    from conftest import batch, tiny_config

    from agx.training.loop import Trainer

    cfg = tiny_config(fsdp=8)
    cfg.train.fault_nan_steps = [2]
    trainer = Trainer.build(cfg, jax.devices())
    state, _ = trainer.step_fn(trainer.init(), trainer.put_batch(batch(corpus, 0, 16)))
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = trainer.step_fn(state, trainer.put_batch(batch(corpus, 1, 16)))
    assert bool(metrics["skipped"]) and int(state.bad_steps) == 1 and int(state.step) == 2
    after = jax.device_get((state.params, state.opt_state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    state, metrics = trainer.step_fn(state, trainer.put_batch(batch(corpus, 2, 16)))
    assert not bool(metrics["skipped"]) and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_never_leaves_a_corrupt_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    settings = ["train.steps=40", "optim.decay_steps=40", "checkpoint.every=1", "checkpoint.keep=3"]
    reference = tmp_path / "reference"
    train(reference, *settings)
    run = tmp_path / "killed"
    rng = np.random.default_rng(0)
    cut_saves = 0
    for trial in range(4):
        newest_before = max(saved_steps(run), default=None) if (run / "checkpoints").exists() else None
        process = start_training(run, *settings)
        start = steps_recorded(run)
        # Three steps on, a save has completed: Orbax starts a save only when the one before is done.
        wait_for(lambda: steps_recorded(run) >= start + 3, process)
        if trial % 2:  # kill while a save is being written
            wait_for(lambda: any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").glob("*")), process)
        else:  # kill at a random moment
            time.sleep(rng.uniform(0.0, 1.5))
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        cut_saves += any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").glob("*"))
        if newest_before is not None:
            assert f"resumed from checkpoint step {newest_before}" in stdout
        steps = saved_steps(run)
        assert steps, "no complete checkpoint after a step was recorded and saved every step"
        manager = ocp.CheckpointManager((run / "checkpoints").absolute(),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        for step in steps:  # every listed checkpoint is complete and readable
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            assert int(state["step"]) == step
    assert cut_saves >= 1, "no kill landed during a save"
    final = train(run, *settings)
    assert f"resumed from checkpoint step {max(steps)}" in final.stdout
    a, b = records(reference), records(run)
    assert sorted(b) == list(range(1, 41))
    assert [b[s]["loss"] for s in range(1, 41)] == [a[s]["loss"] for s in range(1, 41)]


FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=24m agx-full-disk "$WORKDIR"
train() { "$PYTHON" -m agx.train $TINY --workdir "$WORKDIR" "$@"; }
train --set train.steps=4 --set checkpoint.every=2 > "$OUT/first.out" 2>&1; echo $? > "$OUT/first.rc"
# Fill the disk but for what the logs need: the next checkpoint cannot fit.
fallocate -l $(( $(df --output=avail -B1 "$WORKDIR" | tail -1) - 400000 )) "$WORKDIR/filler"
train --set train.steps=8 --set checkpoint.every=2 > "$OUT/full.out" 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
ls "$WORKDIR/checkpoints" > "$OUT/after_full.ls"
"$PYTHON" -c "
import orbax.checkpoint as ocp
m = ocp.CheckpointManager('$WORKDIR/checkpoints', options=ocp.CheckpointManagerOptions(read_only=True))
print(m.all_steps(), [int(m.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']['step'])
                      for s in m.all_steps()])
" > "$OUT/check.out" 2>&1
rm "$WORKDIR/filler"
train --set train.steps=8 --set checkpoint.every=2 > "$OUT/after.out" 2>&1; echo $? > "$OUT/after.rc"
ls "$WORKDIR/checkpoints" > "$OUT/after.ls"
"""


@pytest.mark.slow
def test_a_full_disk_on_save_leaves_the_previous_checkpoints_intact(tmp_path):
    """A real ENOSPC: a 24 MB tmpfs mounted in a private user and mount namespace."""
    workdir, out = tmp_path / "workdir", tmp_path / "out"
    workdir.mkdir(), out.mkdir()
    env = {**env_for(8), "WORKDIR": str(workdir), "OUT": str(out), "PYTHON": sys.executable, "TINY": " ".join(TINY)}
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FULL_DISK_SCRIPT],
                   env=env, check=True, timeout=600)
    read = lambda name: (out / name).read_text()
    assert read("first.rc").strip() == "0", read("first.out")
    assert read("full.rc").strip() == "1", read("full.out") + read("full.err")
    error = one_error_line(subprocess.CompletedProcess([], 1, read("full.out"), read("full.err")), library_noise=True)
    assert "No space left on device" in error and "the complete checkpoints [2, 4]" in error, error
    assert "6" not in read("after_full.ls").split()  # the cut save is not a step
    assert read("check.out").strip().splitlines()[-1] == "[2, 4] [2, 4]", read("check.out")
    assert read("after.rc").strip() == "0", read("after.out")
    assert "resumed from checkpoint step 4" in read("after.out")
    assert read("after.ls").split() == ["4", "6", "8"]  # no partial save left behind
