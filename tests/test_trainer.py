"""The trainer as a user runs it (`python -m agx.train` in real processes, Grain worker processes):
eval, metrics, start-up times, the CPU's peak, the learning-rate schedule and samples, SIGTERM and
non-finite steps. Checkpoints, resume and the kill -9 and full-disk drills are test_checkpoint.py's."""

import json
import math
import signal

import numpy as np
import pytest
from conftest import (events, one_error_line, records, saved_steps, start_training, steps_recorded,
                      train_tiny as train, wait_for)


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
