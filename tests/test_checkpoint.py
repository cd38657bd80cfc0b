"""Checkpoints as a user meets them (real processes, real Orbax checkpoints on disk): exact resume
in a new process, reshard on restore, a plain Orbax reader, foreign, unreadable and set-aside runs,
and what kill -9 at any moment and a full disk leave behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (BASE, TINY, copy_of, env_for, one_error_line, records, saved_steps, start_training,
                      steps_recorded, to_be_killed, train_tiny as train, wait_for)


# A 24-step schedule, and the run that goes straight through it: what a run stopped and resumed at
# any step (in a new process, or after kill -9) must reproduce bit for bit. Saving and the loader's
# worker processes change no number, so the straight run saves once and loads in-process.
SCHEDULE = ["optim.decay_steps=24", "train.steps=24"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    train(workdir, *SCHEDULE, "checkpoint.every=24", "data.workers=0")
    return records(workdir)


@pytest.mark.slow  # a long launched run (see pyproject.toml)
def test_resume_in_a_new_process_is_bit_identical_and_tensorboard_holds_each_step_once(straight, tmp_path):
    resumed = tmp_path / "resumed"
    common = [*SCHEDULE, "checkpoint.every=5", "data.workers=1"]
    train(resumed, *common, "train.steps=10")
    second = train(resumed, *common, "train.steps=20")
    assert "resumed from checkpoint step 10" in second.stdout

    a, b = straight, records(resumed)
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


# One file of each kind a checkpoint holds: array data (the largest OCDBT data file), the data
# iterator's state, and Orbax's tree metadata.
def test_a_checkpoint_with_optaxs_optimizer_layout_restores_the_same_state(base, tmp_path):
    """Before 2026-12-02 the optimizer was optax's chain, and checkpoints hold its state's layout:
    the base run's step 6, saved in that layout, restores the same arrays into agx's AdamW state.
    (Resumed by agx.train, such a step continued with the old code's losses to the last digit.)"""
    import jax

    from agx.checkpoint import Checkpoints, optax_layout
    from agx.config import load_experiment
    from agx.training.loop import Trainer

    cfg = load_experiment("gpt3_tiny", [*TINY[3::2], *BASE, "train.peak_tflops_per_device=0.01"])
    trainer, said = Trainer.build(cfg), []
    state = Checkpoints(copy_of(base, tmp_path), cfg, trainer.plan.logical.params, said.append).restore(
        trainer.plan.target, {})[0]
    old = Checkpoints(tmp_path / "old", cfg, trainer.plan.logical.params, said.append)
    old.save(6, state.replace(opt_state=optax_layout(state.opt_state)), force=True)
    old.close()
    restored = Checkpoints(tmp_path / "old", cfg, trainer.plan.logical.params, said.append).restore(
        trainer.plan.target, {})[0]
    assert any("optimizer state in optax's layout" in line for line in said), said
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def corruptible_files(step_dir: Path) -> list[Path]:
    data = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    return [data, step_dir / "data" / "process_0-of-1.json", step_dir / "state" / "_METADATA"]


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10
    path.write_bytes(content)


def test_the_checksums_cover_every_file_and_name_each_changed_one(base, tmp_path):
    from agx.checkpoint import checksums

    step = base / "checkpoints" / "6"
    saved = json.loads((step / checksums.MANIFEST).read_text())
    manifest = saved["files"]
    assert set(manifest) == {str(p.relative_to(step)) for p in step.rglob("*")
                             if p.is_file() and p.name not in checksums.UNHASHED}
    assert [part["files"] for part in saved["parts"]] == [len(list((step / "state/ocdbt.process_0").rglob("d/*")))
                                                          + 1]  # hashed by the process that wrote them, and its manifest.ocdbt
    assert sorted(sum((checksums.share(manifest, p, 3) for p in range(3)), [])) == sorted(manifest)
    for changed in range(3):
        copy = Path(shutil.copytree(step, tmp_path / str(changed)))
        assert checksums.verify(copy)["files"] == len(manifest)  # the copy is intact until flipped
        flipped = corruptible_files(copy)[changed]
        flip_a_byte(flipped)
        with pytest.raises(checksums.ChecksumMismatch) as mismatch:
            checksums.verify(copy)
        assert str(mismatch.value) == f"content differs from its checksum: {flipped.relative_to(copy)}"


def test_unreadable_and_changed_checkpoints_are_each_set_aside_for_the_one_before(tmp_path):
    """Step 5 lost the second half of every array file (retried, then unreadable); steps 4, 3 and 2
    each have one byte flipped, in another kind of file each (not retried). The run sets each aside
    in turn, and resumes from step 1 with the uninterrupted run's losses."""
    settings = ["mesh.data=1", "mesh.fsdp=8", "train.steps=5", "checkpoint.every=1", "checkpoint.keep=5",
                "checkpoint.read_retries=1", "checkpoint.retry_wait_s=0.1"]
    run = tmp_path / "run"
    train(run, *settings)
    uninterrupted = records(run)
    for path in (run / "checkpoints" / "5" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    flipped = {}
    for step, kind in zip((4, 3, 2), range(3)):
        flipped[step] = corruptible_files(run / "checkpoints" / str(step))[kind]
        flip_a_byte(flipped[step])
    result = train(run, *settings)
    out = result.stdout
    assert "reading checkpoint step 5 failed" in out and "retry 1 of 1 in 0.1 s" in out
    assert len([line for line in out.splitlines() if "warning: checkpoint step 5 is unreadable (state/" in line]) == 1
    warnings = [line for line in out.splitlines() if "fails its checksums" in line]
    assert warnings == [f"agx: warning: checkpoint step {step} fails its checksums (content differs from its "
                        f"checksum: {path.relative_to(run / 'checkpoints' / str(step))}); trying the one before"
                        for step, path in flipped.items()], out
    assert "retry 1 of 1" not in out.split("checkpoint step 5 is unreadable")[1]  # changed bytes: no retry
    assert "checkpoint step 1: checksums match" in out and "resumed from checkpoint step 1" in out
    assert sorted(p.name.split("-step-")[1] for p in (run / "set_aside").iterdir()) == ["2", "3", "4", "5"]
    assert list((run / "set_aside").glob("*-unreadable-step-5/5/state"))
    again = records(run)
    assert [again[s]["loss"] for s in (2, 3, 4, 5)] == [uninterrupted[s]["loss"] for s in (2, 3, 4, 5)]
    assert saved_steps(run) == [1, 2, 3, 4, 5]


@pytest.mark.slow  # a fault drill (see pyproject.toml)
def test_a_checkpoint_that_fails_to_read_for_a_moment_is_retried_not_set_aside(base, tmp_path):
    """The newest checkpoint's arrays vanish from the file system's view (a stale or busy file
    system) and come back while the run waits to retry: it resumes from that step, losing nothing."""
    run = copy_of(base, tmp_path)
    state, hidden = run / "checkpoints" / "6" / "state", tmp_path / "hidden-state"
    state.rename(hidden)
    process = start_training(run, *BASE, "train.steps=7", "checkpoint.retry_wait_s=2")
    try:
        log = run / "train.log"
        wait_for(lambda: "retry 1 of 3" in log.read_text(), process)
        hidden.rename(state)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "reading checkpoint step 6 failed" in out and "resumed from checkpoint step 6" in out, out
    assert "unreadable" not in out and not (run / "set_aside").exists()
    assert saved_steps(run) == [3, 6, 7]


def test_resume_false_starts_fresh_and_keeps_the_old_run_aside(base, tmp_path):
    run = copy_of(base, tmp_path)
    train(run, "train.steps=2", "checkpoint.every=1", "checkpoint.resume=false")
    assert sorted(records(run)) == [1, 2] and saved_steps(run) == [1, 2]
    (aside,) = (run / "set_aside").glob("*-fresh-start")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert sorted(records(aside)) == list(range(1, 7))


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_never_leaves_a_corrupt_checkpoint(straight, tmp_path):
    import orbax.checkpoint as ocp

    from agx.checkpoint import checksums

    settings = [*SCHEDULE, "checkpoint.every=1", "checkpoint.keep=3", "data.workers=1"]
    run = tmp_path / "killed"
    env = to_be_killed(env_for(8), tmp_path / "xla-cache")
    rng = np.random.default_rng(0)
    cut_saves = 0
    for trial in range(2):  # one kill at a random moment, one while a save is being written
        newest_before = max(saved_steps(run), default=None) if (run / "checkpoints").exists() else None
        process = start_training(run, *settings, env=env)
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
            assert checksums.verify(run / "checkpoints" / str(step))["files"] > 0  # and committed with its manifest
    assert cut_saves >= 1, "no kill landed during a save"
    final = train(run, *settings)
    assert f"resumed from checkpoint step {max(steps)}" in final.stdout
    a, b = straight, records(run)
    assert sorted(b) == list(range(1, 25))
    assert [b[s]["loss"] for s in range(1, 25)] == [a[s]["loss"] for s in range(1, 25)]


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


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += children - found
            found |= children
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_the_loader_workers_of_a_trainer_killed_by_sigkill_exit_on_their_own(tmp_path):
    """kill -9 of the trainer alone, as the OOM killer does it (not its process group): every process
    it started (the Grain worker, multiprocessing's resource tracker) is gone within 10 s."""
    env = to_be_killed(env_for(8), tmp_path / "xla-cache")
    run = tmp_path / "run"
    process = start_training(run, "train.steps=1000", "data.workers=1", env=env)
    def workers():
        cmdlines = {p: Path(f"/proc/{p}/cmdline") for p in descendants(process.pid)}
        return {p for p, c in cmdlines.items() if c.exists() and b"spawn_main" in c.read_bytes()}

    try:
        wait_for(lambda: steps_recorded(run) >= 3 and workers(), process)  # the worker's buffer full, idle
        started = descendants(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if alive(p)], "left running after the trainer's SIGKILL"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left, so that the session goes on
        except ProcessLookupError:
            pass
