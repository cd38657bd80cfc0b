"""8 simulated CPU devices for every test, set before jax is first imported."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agx.runtime import simulate_cpu_devices  # imports no JAX


def fast_xla_flags() -> str:
    """The tests compile a few hundred programs and check numbers, not speed: backend optimisation
    off and, where this XLA has the flag, the CPU's loop fusion emitters in place of the MLIR ones
    (a sharded tiny step built and ran in about two thirds of the time); and the CPU scheduler that
    reorders for concurrency off: a Llama FSDP step on 8 devices, loaded from the persistent
    compilation cache, deadlocked in two collectives that devices entered in different orders (a
    fresh compile of it ran; jax 0.10.2). XLA aborts on a flag it does not know, so a probe process
    asks it, once per session (workers and subprocesses inherit it)."""
    if "AGX_TEST_XLA_FLAGS" not in os.environ:
        flags = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
        for optional in ("--xla_cpu_use_fusion_emitters=false",
                         "--xla_cpu_enable_concurrency_optimized_scheduler=false"):
            probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": optional})
            flags += [optional] if probe.returncode == 0 else []
        os.environ["AGX_TEST_XLA_FLAGS"] = " ".join(flags)
    return os.environ["AGX_TEST_XLA_FLAGS"]


FAST_XLA = " " + fast_xla_flags()
# Each flag once: pytest-xdist's workers load this file after their controller did, and a flag given
# twice is another key in JAX's compilation cache, which would then share nothing between the workers
# and the `agx.train` processes they start with the same flags (env_for).
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(
    os.environ.get("XLA_FLAGS", "").split() + ["--xla_force_host_platform_device_count=8"] + FAST_XLA.split()))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
simulate_cpu_devices(8)  # the flag as above; and XLA's CPU thread pools with room for collectives to wait
MADE_HERE = []  # the session's own folders, removed when it ends (pytest_sessionfinish)


def session_folder(variable: str, prefix: str) -> str:
    """The folder that `variable` names (one a developer keeps between runs), or else a fresh one for
    this session: made by the process that loads this file first (pytest, or with -n 2 its
    controller), and inherited through the environment by the workers and subprocesses it starts."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        MADE_HERE.append(os.environ[variable])
    return os.environ[variable]


# One cache per test session, shared with the subprocesses and pytest-xdist workers it starts: the
# built-in corpus is built once.
session_folder("AGX_CACHE_DIR", "agx-test-cache-")
# What more than one worker reads is made once, in a folder of the session's own.
SESSION_DIR = Path(session_folder("AGX_TEST_SESSION_DIR", "agx-test-session-"))
# JAX's persistent compilation cache, made fresh for each session in the same way: a program that
# another test, worker or `agx.train` process already compiled (the same HLO, flags and devices) is
# loaded instead of compiled again. A size limit turns on JAX's file lock, so that processes writing
# and reading one entry at once never see it half-written. Not on jaxlib 0.5 (the xpu stack): there a
# sharded step loaded from the cache deadlocked on its first call (a restored `agx.train` run hung
# deleting its donated buffers), so that stack compiles every program.
JAXLIB = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
if JAXLIB >= (0, 10):  # the newest stack, where the whole suite ran with it
    session_folder("JAX_COMPILATION_CACHE_DIR", "agx-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from agx.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from agx.data.dataset import make_samples  # noqa: E402
from agx.recipes import llama_model  # noqa: E402
from agx.training.loop import Trainer  # noqa: E402


# Under pytest-xdist (`-n 2`, as the README's test command runs), each module runs whole on one
# worker (--dist loadfile), so that its module-scoped fixtures are built once. The slowest modules
# go first (measured with --durations), so that the workers finish together. (Not xdist_group
# markers: with pytest 9.2 and pytest-xdist 3.8 they group nothing.)
SLOWEST_FIRST = ["test_checkpoint", "test_multiprocess", "test_plan", "test_pipeline", "test_equivalence", "test_context",
                 "test_padding",
                 "test_notebooks", "test_sampling", "test_export", "test_cli", "test_trainer", "test_model",
                 "test_data_tools"]


def pytest_sessionfinish(session):
    for folder in MADE_HERE:  # in the process that made them, after its workers have finished
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items):
    order = {name: rank for rank, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.stem, len(order)))  # stable: else in collection order


def tiny_config(**mesh) -> Config:
    """Small enough to compile in seconds; every dimension divisible by 8."""
    return Config(
        name="test_tiny",
        model=ModelConfig(num_layers=2, d_model=64, num_heads=8, seq_len=32, vocab_size=2048),
        mesh=MeshConfig(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh}),
        train=TrainConfig(steps=3, batch_size=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
    )


def llama_tiny_config(**mesh) -> Config:
    """tiny_config's shapes in the Llama architecture: 8 query heads share 2 KV heads, so `tensor`
    of 2 splits the KV heads and `tensor` of 8 keeps them whole on every rank."""
    cfg = tiny_config(**mesh)
    cfg.model = llama_model(num_layers=2, d_model=64, num_heads=8, num_kv_heads=2, ffn_size=176, seq_len=32,
                            vocab_size=2048)
    return cfg


ARCHITECTURES = {"gpt3": tiny_config, "llama": llama_tiny_config}


@pytest.fixture(scope="session")
def corpus():
    """tiny_config's training samples from the built-in corpus."""
    return make_samples(tiny_config(), num_samples=64)


def batch(samples, step: int, batch_size: int) -> np.ndarray:
    return np.stack([samples[step * batch_size + i] for i in range(batch_size)])


def run_steps(cfg: Config, corpus, devices, steps: int = 3):
    """Trains `steps` steps; returns the losses and the final parameters on the host, at the model's
    shapes. Where the mesh pads the state (agx.parallel.padding), every padded entry of every weight
    and optimizer moment must still be exactly zero."""
    trainer = Trainer.build(cfg, devices)
    state = trainer.init()
    losses = []
    for step in range(steps):
        state, metrics = trainer.step_fn(state, trainer.put_batch(batch(corpus, step, cfg.train.batch_size)))
        losses.append(float(metrics["loss"]))
    stored = jax.device_get(state)
    assert not np.any(padding_of(stored, trainer.plan.logical)), "the padding moved off zero"
    cut = lambda x, a: x[tuple(slice(0, n) for n in a.shape)]
    return np.array(losses), jax.tree_util.tree_map(cut, stored.params, trainer.plan.logical.params)


def padding_of(stored, logical) -> np.ndarray:
    """The padded entries of a stored tree (host arrays), beyond each leaf's logical shape."""
    def beyond(x, a):
        inside = np.zeros(x.shape, bool)
        inside[tuple(slice(0, n) for n in a.shape)] = True
        return np.asarray(x)[~inside].ravel()

    return np.concatenate([beyond(x, a) for x, a in zip(jax.tree_util.tree_leaves(stored),
                                                         jax.tree_util.tree_leaves(logical))])


def assert_same_run(run, reference):
    losses, params = run
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert ref_losses[-1] < ref_losses[0]  # the reference itself is training
    # Adam's first update is lr·sign(g): an element whose gradient is ~0 can flip with the summation
    # order of the layout and move by up to 2·lr per step. Allow that for a handful of elements only;
    # a layout bug moves a whole slice of a weight.
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(ref_params)):
        off = ~np.isclose(got, want, rtol=1e-4, atol=1e-5)
        assert off.sum() <= max(1, off.size // 10_000), (jax.tree_util.keystr(path), int(off.sum()))
        np.testing.assert_allclose(got, want, atol=2 * 1e-3 * len(losses), err_msg=jax.tree_util.keystr(path))


# As a user runs it: no JAX_PLATFORMS, so agx.train makes its own backend choice.
# The `agx.train` processes size XLA's thread pools themselves (agx.runtime.simulate_cpu_devices).
CLI_ENV = {**{k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "PJRT_NPROC")},
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def agx_train(*args, env=CLI_ENV, timeout=300, **popen):
    """Runs `python -m agx.train ARGS` to the end; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "agx.train", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **popen)


# The tiny model as a command line: gpt3_tiny cut down to tiny_config's shapes. Loaded in the
# training process: a Grain worker process costs 2.5 s of every start (it imports what the trainer
# does); the tests of the worker path ask for workers themselves (resume in a new process, restore
# onto another mesh, the kill -9 drill, the multi-process jobs, tests/test_loader.py).
TINY = ["--experiment", "gpt3_tiny"] + [arg for setting in [
    "model.num_layers=2", "model.d_model=64", "model.seq_len=32", "model.scan_unroll=1", "train.batch_size=16",
    "train.log_every=100", "eval.every=0", "data.workers=0"] for arg in ("--set", setting)]


def env_for(devices: int) -> dict:
    return {**CLI_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}{FAST_XLA}"}


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def shared_run(name: str, *settings) -> Path:
    """A workdir of the tiny model trained with `settings` on 8 devices, once a session, by whichever
    worker asks first (under a file lock); the tests only read it, or copy it (copy_of)."""
    from filelock import FileLock

    workdir = SESSION_DIR / name
    with FileLock(SESSION_DIR / f"{name}.lock"):
        if not (SESSION_DIR / f"{name}.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)  # what a failed try left
            train_tiny(workdir, *settings)
            (SESSION_DIR / f"{name}.done").touch()
    return workdir


@pytest.fixture(scope="session")
def trained():
    """The tiny model trained 8 steps on fsdp=8 (sharded checkpoints at steps 4 and 8)."""
    return shared_run("trained", "mesh.data=1", "mesh.fsdp=8", "train.steps=8", "checkpoint.every=4",
                      "optim.lr=3e-3", "optim.warmup_steps=2")


@pytest.fixture(scope="session")
def base():
    """The tiny model trained 6 steps on fsdp=8, checkpoints and evals at 3 and 6, MFU against 0.01."""
    return shared_run("base", *BASE, "train.peak_tflops_per_device=0.01")


def train_tiny(workdir, *settings, devices=8, expect=0):
    result = agx_train(*TINY, "--workdir", str(workdir), *sets(*settings), env=env_for(devices))
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


BASE = ["mesh.data=1", "mesh.fsdp=8", "train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.batches=2"]


def copy_of(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def start_training(workdir, *settings, env=None):
    """A trainer in its own process group (kill -9 takes its loader workers too, as a node failure does)."""
    return subprocess.Popen([sys.executable, "-m", "agx.train", *TINY, "--workdir", str(workdir), *sets(*settings)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or env_for(8),
                            start_new_session=True)


def to_be_killed(env: dict, cache: Path) -> dict:
    """`env` for processes that a test kills with SIGKILL: a compilation cache of their own. JAX's
    size-limited cache writes an entry, then its access time; an entry killed between the two makes
    every later write to that folder fail (jax 0.10 reads every access time to evict), and the rest
    of the session would compile again what it meant to share. It starts as a copy of the shared one."""
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        return env
    shutil.copytree(env["JAX_COMPILATION_CACHE_DIR"], cache, dirs_exist_ok=True)
    return {**env, "JAX_COMPILATION_CACHE_DIR": str(cache)}


# --- reading a run's results ----------------------------------------------------------------------

def records(workdir) -> dict[int, dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "event" not in r]
    assert len({r["step"] for r in steps}) == len(steps), "a step is recorded twice"
    return {r["step"]: r for r in steps}


def events(workdir, name) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == name]


def saved_steps(workdir) -> list[int]:
    """The steps as a plain Orbax user lists them."""
    import orbax.checkpoint as ocp

    return list(ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                      options=ocp.CheckpointManagerOptions(read_only=True)).all_steps())


def one_error_line(result, library_noise=False) -> str:
    """The one `agx: error:` line on stderr. library_noise: TensorStore prints its own tracebacks for
    the writes it abandons on a full disk (not agx's to silence)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("agx: error: ")]
    assert len(errors) == 1, result.stderr
    assert library_noise or "Traceback" not in result.stderr, result.stderr
    return errors[0]


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def steps_recorded(workdir) -> int:
    path = workdir / "metrics.jsonl"
    return sum('"step"' in line and '"event"' not in line for line in path.read_text().splitlines()) \
        if path.exists() else 0


# --- which stack a test can fail on ---------------------------------------------------------------

# What differs between the two dependency stacks (pyproject's `xpu` pins against the newest releases).
STACK_PACKAGES = {"jax", "jaxlib", "flax", "optax", "chex", "orbax", "grain", "tensorstore",
                  "intel_extension_for_openxla"}
AGX = Path(__file__).resolve().parent.parent / "agx"


def agx_imports(module: str, seen=None) -> set[str]:
    """Every top-level package that `module` (agx.x.y) imports, following agx's own imports."""
    import ast

    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    path = AGX.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    if not path.is_file():  # a namespace package: only its modules import anything
        return found
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:  # `from agx import x`: agx.x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module.startswith("agx")
                                     and AGX.parent.joinpath(*node.module.split("."), a.name).with_suffix(".py").is_file()]
        else:
            names = []
        for name in names:
            found |= agx_imports(name, seen) if name.split(".")[0] == "agx" else {name.split(".")[0]}
    return found
