"""What a run reports and where: model FLOP/s and MFU against a per-device peak, and one writer
that sends each record to metrics.jsonl, TensorBoard and the console (process 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from agx.data.cache import write_atomic
from agx.errors import RunError

# Dense peak TFLOP/s per JAX device by compute dtype, from the vendors' data sheets. An Aurora
# tile (ZE_FLAT_DEVICE_HIERARCHY=FLAT) is half a Max 1550: 128 Xe cores × 8 XMX engines × 512 bf16
# FLOP/clock × 1.6 GHz = 838.9 per GPU; float32 runs on the vector engines (52.4 per GPU). NVIDIA
# float32 is the TF32 tensor-core figure, which is what XLA's default matmul precision uses there.
PEAK_TFLOPS = {
    "Max 1550": {"bfloat16": 419.4, "float16": 419.4, "float32": 26.2},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # SXM
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}


def measured_matmul_tflops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """The median throughput of one square matmul on the first device: the CPU's practical peak."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[repeats // 2] / 1e12


def peak_tflops_per_device(device, dtype: str, override: float | None,
                           cache_dir: Path | None = None) -> tuple[float, str]:
    """(peak, where it came from). CPU devices share the host's cores, so each gets its share of
    the measured matmul rate. With `cache_dir` (a training run) a CPU is measured once and the figure
    reused, so that every run on it divides by the same peak; without (a benchmark) it is measured now."""
    if override:
        return override, "train.peak_tflops_per_device"
    for kind, peaks in PEAK_TFLOPS.items():
        if kind in device.device_kind:
            return peaks[dtype], f"{kind} data sheet"
    if device.platform == "cpu":
        local = jax.local_device_count()
        if cache_dir is None:
            return measured_matmul_tflops(dtype) / local, f"measured CPU matmul / {local} devices"
        return _cached_cpu_matmul_tflops(dtype, cache_dir) / local, \
            f"CPU matmul measured once, in {cache_dir / CPU_PEAKS} / {local} devices"
    return math.nan, f"unknown device kind {device.device_kind!r}: set train.peak_tflops_per_device"


CPU_PEAKS = "cpu-matmul-tflops.json"


def _cached_cpu_matmul_tflops(dtype: str, cache_dir: Path) -> float:
    """measured_matmul_tflops, keyed by what it depends on: the CPU, its cores, the devices, the dtype."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    key = f"{cpu}, {os.cpu_count()} cores, {jax.local_device_count()} devices, {dtype}, jax {jax.__version__}"
    path = cache_dir / CPU_PEAKS
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: measured again
        known = {}
    if not isinstance(known.get(key), float):
        known[key] = measured_matmul_tflops(dtype)
        with contextlib.suppress(OSError):  # a read-only cache costs a measurement next time, nothing more
            write_atomic(path, lambda f: f.write(json.dumps(known, indent=1).encode()))
    return known[key]


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


class MetricsWriter:
    """Writes records to WORKDIR/metrics.jsonl and WORKDIR/tensorboard, and log lines to the console
    and WORKDIR/train.log. On other processes than 0 it writes nothing."""

    def __init__(self, workdir: Path, log_every: int):
        self.enabled = jax.process_index() == 0
        self.workdir, self.log_every = workdir, log_every
        self.started = False
        if self.enabled:
            self.log_file = open(workdir / "train.log", "a")

    def start(self, first_step: int, total_steps: int) -> None:
        """Opens the step outputs once the step to start from is known."""
        self.total_steps, self.started = total_steps, self.enabled
        if not self.enabled:
            return
        from tqdm import tqdm

        self.jsonl_path = self.workdir / "metrics.jsonl"
        _keep_records_up_to(self.jsonl_path, first_step)  # a resumed run replaces what came after
        self.jsonl = open(self.jsonl_path, "a")
        # purge_step: TensorBoard drops the events a killed run wrote after the step resumed from.
        self.tensorboard = _summary_writer()(str(self.workdir / "tensorboard"), purge_step=first_step + 1)
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise RunError(f"cannot write the run's logs and metrics in {self.workdir} ({e.strerror or e})") from e

    def log(self, line: str) -> None:
        if self.enabled:
            with self._writing():
                self._log(line)

    def _log(self, line: str) -> None:
        if self.started:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def event(self, name: str, **fields) -> None:
        """A record that is not a step's: start-up timings, a stop on a signal."""
        if not self.started:
            return
        with self._writing():
            self.jsonl.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")
            self.jsonl.flush()
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{name}/{key}", value, fields.get("step", 0))

    def step(self, record: dict) -> None:
        if self.started:
            with self._writing():
                self._step(record)

    def _step(self, record: dict) -> None:
        step = record["step"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step":
                group = "eval" if key.startswith("eval_") else "train"
                self.tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
        if "loss" in record:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if step % self.log_every == 0 or step == self.total_steps:
                self._log(f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                         f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                         f"{record['model_tflops_per_s_per_device']:.3g} TFLOP/s/device | "
                         f"MFU {record['mfu']:.1%} | {record['step_s'] * 1e3:.0f} ms")
        if "eval_loss" in record:
            self._log(f"eval {step:6d} | loss {record['eval_loss']:.4f} | perplexity {record['eval_perplexity']:.2f}")

    def close(self) -> None:
        """Best effort: on a full disk the last lines may not land, and the error that ended the run
        is the one to report."""
        closers = [self.bar.close, self.tensorboard.close, self.jsonl.close] if self.started else []
        for close in closers + ([self.log_file.close] if self.enabled else []):
            try:
                close()
            except OSError:
                pass


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without the step records after `step`, and without a
    line cut short by a killed process."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in record or record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported with torch hidden: where torch is installed,
    tensorboardX imports it (about 3 s of every start) for torch tensors that agx never passes.
    torch stays importable afterwards."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter
