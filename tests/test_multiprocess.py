"""Training across processes on this machine (127.0.0.1 only), as a user launches it: with
`python -m agx.launch` and with OpenMPI's `mpiexec`. Two processes of 4 CPU devices give the losses of
one process of 8; checkpoints move between process counts; a dying process stops the job; bad
coordinator settings fail in bounded time with one line."""

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
from conftest import TINY, agx_train, env_for, one_error_line, records, sets, to_be_killed

from agx.launch import free_port

# data=2 × fsdp=4: the process boundary splits the data axis, so every step all-reduces across it.
MESH = ("mesh.data=2", "mesh.fsdp=4", "checkpoint.every=5", "eval.every=5", "eval.batches=2")
LAUNCH = [sys.executable, "-m", "agx.launch", "--nproc", "2", "--devices-per-process", "4", "--"]
TRAIN = [sys.executable, "-m", "agx.train", *TINY, "--set", "data.workers=1"]  # each process with its loader worker
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.slow  # every test here starts a job of several processes


def run(command, workdir, *settings, env=None, timeout=300):
    result = subprocess.run([*command, "--workdir", str(workdir), *sets(*MESH, *settings)], capture_output=True,
                            text=True, env=env or env_for(8), timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


# Straight runs, one process or two, repeat bit for bit under load (three at once, 2026-12-02). After
# a restore, under load (this file beside the equivalence tests on two workers), the resumed
# two-process run's first step differed from one process's: loss 6e-7, gradient norm 1e-5 (and a
# later step up to 8e-5), while the steps between matched to every digit. Not traced; see the README.
RTOL = {"loss": 1e-5, "grad_norm": 2e-4, "lr": 1e-5}


def assert_same_steps(run_records, reference, steps):
    for step in steps:
        for key, rtol in RTOL.items():
            np.testing.assert_allclose(run_records[step][key], reference[step][key], rtol=rtol,
                                       err_msg=f"step {step} {key}")
        if "eval_loss" in reference[step]:
            np.testing.assert_allclose(run_records[step]["eval_loss"], reference[step]["eval_loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 8 devices, 15 steps: what every multi-process run must reproduce."""
    workdir = tmp_path_factory.mktemp("one-process")
    run(TRAIN, workdir, "train.steps=15")
    return records(workdir)


# Process 1 alone finds the newest checkpoint's arrays gone (a tmpfs over them, in a mount namespace
# of its own): a host whose view of the shared file system is stale. sh -c SCRIPT HIDDEN COMMAND...
STALE_FOR_PROCESS_1 = ["sh", "-c", 'if [ "$AGX_PROCESS_ID" = 1 ]; then exec unshare --mount sh -c '
                       '\'mount -t tmpfs stale "$0" && exec "$@"\' "$0" "$@"; fi; exec "$@"']


def test_two_launched_processes_match_one_and_their_checkpoint_resumes_in_one(reference, tmp_path):
    launched = run(LAUNCH + TRAIN, tmp_path, "train.steps=10")
    assert "[0] agx: runtime: 2 processes (AGX_* variables), 8 cpu devices" in launched.stdout
    assert_same_steps(records(tmp_path), reference, range(1, 11))
    step = tmp_path / "checkpoints" / "10"  # each process wrote its own shards and its own data position
    assert (step / "state" / "ocdbt.process_0").is_dir() and (step / "state" / "ocdbt.process_1").is_dir()
    assert sorted(p.name for p in (step / "data").glob("process_*")) == ["process_0-of-2.json",
                                                                         "process_1-of-2.json"]
    parts = json.loads((step / "checksums.json").read_text())["parts"]  # each hashed what it wrote
    assert [part["files"] for part in parts] == [sum(f.is_file() for f in (step / f"state/ocdbt.process_{p}").rglob("*"))
                                                 for p in (0, 1)]

    # Both processes resume from the checkpoint before, as process 1 cannot read step 10's arrays.
    stale = run(LAUNCH + STALE_FOR_PROCESS_1 + [str(step / "state")] + TRAIN, tmp_path, "train.steps=10",
                "checkpoint.read_retries=0")
    warned = [line for line in stale.stdout.splitlines() if "warning: checkpoint step 10 is unreadable" in line]
    assert len(warned) == 1 and "(process 1: state/" in warned[0], stale.stdout
    assert "[0] agx: resumed from checkpoint step 5" in stale.stdout
    assert list(tmp_path.glob("set_aside/*-unreadable-step-10/10/state/ocdbt.process_1"))
    assert_same_steps(records(tmp_path), reference, range(6, 11))

    resumed = run(TRAIN, tmp_path, "train.steps=15")
    assert "resumed from checkpoint step 10" in resumed.stdout
    assert "restarts at batch 10" in resumed.stdout  # 2 processes' Grain states do not apply to 1
    assert_same_steps(records(tmp_path), reference, range(11, 16))


def test_a_fresh_start_in_two_processes_sets_the_old_run_aside_once(reference, tmp_path):
    old = tmp_path / "old"
    run(TRAIN, old, "train.steps=2")
    run(LAUNCH + TRAIN, old, "train.steps=2", "checkpoint.resume=false")
    (aside,) = (old / "set_aside").iterdir()  # one move, by process 0, before either process looked again
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl", "tensorboard"]
    assert_same_steps(records(old), reference, [1, 2])
    assert_same_steps(records(aside), reference, [1, 2])


def test_sequences_split_across_processes_train_as_one_process(reference, tmp_path):
    """context=8 over two processes of 4 devices: each process loads every row, and holds half of each
    sequence (agx.parallel.context); the keys and values are gathered across the process boundary."""
    run(LAUNCH + TRAIN, tmp_path, "train.steps=2", "mesh.data=1", "mesh.fsdp=1", "mesh.context=8")
    assert_same_steps(records(tmp_path), reference, [1, 2])


@pytest.mark.skipif(MPIEXEC is None and not os.environ.get("AGX_REQUIRE_MPI"), reason="no mpiexec here")
def test_mpiexec_runs_two_processes_from_a_one_process_checkpoint(reference, tmp_path):
    assert MPIEXEC, "AGX_REQUIRE_MPI is set but mpiexec is missing"
    run(TRAIN, tmp_path, "train.steps=5")
    env = {**env_for(8), "AGX_DEVICES_PER_PROCESS": "4"}
    mpi = run([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "AGX_DEVICES_PER_PROCESS",
               *TRAIN], tmp_path, "train.steps=10", env=env)
    assert "agx: runtime: 2 processes (OpenMPI), 8 cpu devices" in mpi.stdout + mpi.stderr
    assert "resumed from checkpoint step 5" in mpi.stdout
    assert_same_steps(records(tmp_path), reference, range(6, 11))


def environ_of(pid) -> dict[str, str]:
    text = Path(f"/proc/{pid}/environ").read_text()
    return dict(item.split("=", 1) for item in text.split("\0") if "=" in item)


def job_processes(coordinator: str) -> dict[int, str]:
    """pid -> AGX_PROCESS_ID of every live process (trainers and their loader workers) of one job."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = environ_of(proc.name)
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError):
            continue
        if environ.get("AGX_COORDINATOR") == coordinator and state != "Z":
            found[int(proc.name)] = environ["AGX_PROCESS_ID"]
    return found


def start_launched(workdir, *settings):
    """agx.launch running 2 training processes, once both are in the training loop (some to be killed)."""
    env = to_be_killed(env_for(8), workdir.with_name(workdir.name + "-xla-cache"))
    launcher = subprocess.Popen([*LAUNCH, *TRAIN, "--workdir", str(workdir),
                                 *sets(*MESH, "train.log_every=1", *settings)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in launcher.stdout:
        if line.startswith("[0] step      2"):
            return launcher
    pytest.fail(launcher.stderr.read())


def launched_ranks(launcher) -> tuple[dict[str, int], str]:
    """{AGX_PROCESS_ID: pid} of the launcher's children, and the job's coordinator address."""
    ranks, coordinator = {}, None
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = environ_of(pid)
        ranks[environ["AGX_PROCESS_ID"]], coordinator = int(pid), environ["AGX_COORDINATOR"]
    return ranks, coordinator


def test_a_killed_process_stops_the_whole_job_within_seconds(tmp_path):
    launcher = start_launched(tmp_path, "train.steps=100000", "checkpoint.every=100000")
    ranks, coordinator = launched_ranks(launcher)
    killed = time.monotonic()
    os.kill(ranks["1"], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=60)
    stopped_in = time.monotonic() - killed
    assert launcher.returncode == 128 + signal.SIGKILL, stderr
    assert "agx.launch: process 1 was killed by SIGKILL; stopping process 0" in stderr
    assert stopped_in < 15, f"the launcher took {stopped_in:.1f}s to stop the job"
    assert job_processes(coordinator) == {}, "processes of the job outlived the launcher"


@pytest.mark.parametrize("signalled", ["launcher", "process 1 alone"])
def test_a_stop_signal_stops_every_process_after_the_same_step_with_one_checkpoint(tmp_path, signalled):
    launcher = start_launched(tmp_path, "train.steps=100000", "checkpoint.every=100000")
    ranks, _ = launched_ranks(launcher)
    if signalled == "launcher":
        launcher.send_signal(signal.SIGTERM)  # as PBS or SLURM signal the job's launcher
    else:
        os.kill(ranks["1"], signal.SIGUSR1)  # the other process never hears of it but from process 1
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, stdout[-3000:] + stderr[-3000:]
    last = max(records(tmp_path))
    stopped = [line for line in stdout.splitlines() if "newest checkpoint is step" in line]
    assert stopped == [f"[0] agx: {'SIGTERM' if signalled == 'launcher' else 'SIGUSR1'} at step {last}: newest "
                       f"checkpoint is step {last}; exiting"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / str(last) / "data").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]


def agx_process(rank: int, count: int, coordinator: str, timeout_s: int = 5):
    env = {**env_for(4), "AGX_COORDINATOR": coordinator, "AGX_NUM_PROCESSES": str(count),
           "AGX_PROCESS_ID": str(rank)}
    return subprocess.Popen([*TRAIN, *sets(f"runtime.init_timeout_s={timeout_s}")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finished(process, timeout=60):
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_wrong_coordinator_port_fails_in_bounded_time_with_one_line():
    coordinator = f"127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    result = finished(agx_process(1, 2, coordinator))
    assert time.monotonic() - started < 40
    assert result.returncode == 2
    assert one_error_line(result) == (f"agx: error: process 1 of 2 (AGX_* variables): could not reach the "
                                      f"coordinator {coordinator} within 5s; is process 0 running, with the same "
                                      "coordinator address and port?")


def test_processes_that_disagree_on_the_count_fail_in_bounded_time_with_one_line():
    coordinator = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    first, second = agx_process(0, 2, coordinator), agx_process(1, 3, coordinator)
    results = [finished(first), finished(second)]
    assert time.monotonic() - started < 40
    for rank, result in enumerate(results):
        assert result.returncode == 2
        assert one_error_line(result) == (f"agx: error: process {rank} of {2 + rank} (AGX_* variables): the "
                                          "processes disagree: process 1 expects 3 processes, process 0 expects 2")


def test_process_zero_alone_says_who_is_missing():
    result = finished(agx_process(0, 3, f"127.0.0.1:{free_port()}", timeout_s=2))
    assert result.returncode == 2
    assert "processes 1, 2 did not reach the coordinator" in one_error_line(result)


@pytest.mark.parametrize("env, error", [
    ({"AGX_NUM_PROCESSES": "2", "AGX_PROCESS_ID": "2", "AGX_COORDINATOR": "127.0.0.1:1234"},
     "AGX_* variables: process id 2 is outside 0..1"),
    ({"AGX_NUM_PROCESSES": "2", "AGX_PROCESS_ID": "1", "AGX_COORDINATOR": "127.0.0.1"},
     "coordinator address '127.0.0.1' is not host:port with a port in 1..65535"),
    ({"AGX_NUM_PROCESSES": "two"}, "AGX_NUM_PROCESSES='two' is not an integer"),
    ({"AGX_NUM_PROCESSES": "2", "AGX_PROCESS_ID": "1"},
     "process 1 of 2 (AGX_* variables): no coordinator address; set AGX_COORDINATOR=host:port"),
])
def test_bad_process_settings_are_one_line(env, error):
    result = agx_train(*TINY, env={**env_for(4), **env}, timeout=60)
    assert result.returncode == 2
    assert error in one_error_line(result)


def test_a_platform_that_cannot_start_is_one_line():
    import importlib.metadata

    try:
        plugin = bool(importlib.metadata.version("intel-extension-for-openxla"))  # the xpu stack's
    except importlib.metadata.PackageNotFoundError:
        plugin = False
    result = agx_train(*TINY, *sets("runtime.platform=xpu"), timeout=60)
    assert result.returncode == 2
    assert one_error_line(result).startswith(
        "agx: error: runtime.platform=xpu: the Intel XPU plugin " + ("cannot load (" if plugin else "is not installed"))
    result = agx_train(*TINY, *sets("runtime.platform=cuda"), timeout=60)
    assert result.returncode == 2
    assert one_error_line(result) == ("agx: error: runtime.platform=cuda: JAX's CUDA plugin is not installed "
                                      "(pip install 'jax[cuda12]')")


# --- process discovery from each launcher's variables ------------------------------------------------

def discovered(env, **settings):
    from agx.config import RuntimeConfig
    from agx.runtime.launchers import discover

    p = discover(RuntimeConfig(**settings), env)
    return p.launcher, p.num_processes, p.process_id, p.local_rank, p.local_size, p.coordinator


def test_aurora_mpiexec_under_pbs_takes_the_coordinator_from_the_node_file(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x4102c5s0b0n0.hostmgmt.cm.aurora.alcf.anl.gov\nx4102c5s1b0n0.hostmgmt.cm.aurora.alcf.anl.gov\n")
    env = {"PALS_RANKID": "13", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "12", "PMI_RANK": "13",
           "PMI_SIZE": "24", "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "1234567.aurora-pbs-0001"}
    port = 20000 + 1234567 % 40000
    assert discovered(env) == ("Cray PALS", 24, 13, 1, 12, f"x4102c5s0b0n0.hostmgmt.cm.aurora.alcf.anl.gov:{port}")
    assert discovered({**env, "AGX_COORDINATOR_PORT": "4321"})[-1].endswith(":4321")
    assert discovered({**env, "AGX_COORDINATOR": "10.0.0.1:99"})[-1] == "10.0.0.1:99"


def test_hydra_pmi_openmpi_and_slurm_on_one_node_use_the_loopback_address():
    assert discovered({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
                       "AGX_COORDINATOR_PORT": "5000"}) == ("PMI", 4, 1, 1, 4, "127.0.0.1:5000")
    assert discovered({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                       "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_MCA_ess_base_jobid": "7"}) == \
        ("OpenMPI", 4, 3, 3, 4, f"127.0.0.1:{20000 + 7}")
    assert discovered({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "gpu3"}) == \
        ("SLURM", 2, 0, 0, 2, f"127.0.0.1:{20000 + 99}")


def test_slurm_across_nodes_takes_the_first_host_of_the_node_list():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "12", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "4(x2),4", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "nid[0012-0013,0020],x1"}
    assert discovered(env) == ("SLURM", 12, 9, 1, 4, f"nid0012:{20000 + 5}")
    assert discovered({**env, "SLURM_STEP_NUM_TASKS": "10", "SLURM_STEP_TASKS_PER_NODE": "2(x5)",
                       "SLURM_STEP_NODELIST": "nid[0020-0024]"}) == ("SLURM", 10, 9, 1, 2, f"nid0020:{20000 + 5}")


def test_settings_override_the_launcher_and_a_multi_node_job_without_a_host_is_refused():
    from agx.errors import UserError

    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    with pytest.raises(UserError, match=r"process 1 of 8 \(OpenMPI\): no coordinator address"):
        discovered(env)
    assert discovered(env, coordinator="node0:7000")[-1] == "node0:7000"
    assert discovered({}) == ("single", 1, 0, 0, 1, None)
    assert discovered({}, num_processes=2, process_id=1, coordinator="127.0.0.1:7") == \
        ("runtime settings", 2, 1, 0, 1, "127.0.0.1:7")


def test_a_job_of_several_processes_on_the_intel_plugin_routes_its_collectives_through_oneccl():
    """The environment the runtime builds before JAX starts: every switch the plugin reads, for
    `auto` and `xpu` with 2 processes; a value the user set is kept; nothing for one process or for
    the other platforms."""
    from agx.runtime import ONECCL_SWITCHES, collectives_environment

    for platform in ("auto", "xpu"):
        env = {"ALLTOALL_USE_ONECCL": "0"}
        collectives_environment(platform, 2, env)
        assert env == {**dict.fromkeys(ONECCL_SWITCHES, "1"), "ALLTOALL_USE_ONECCL": "0"}
    for platform, count in [("xpu", 1), ("auto", 1), ("cuda", 2), ("cpu", 2)]:
        env = {}
        collectives_environment(platform, count, env)
        assert env == {}
    from agx.runtime.platform import _xpu_plugin_dir

    plugin = _xpu_plugin_dir()  # the xpu stack: the switches are the plugin's own strings
    if plugin is not None:
        binary = (plugin / "pjrt_plugin_xpu.so").read_bytes()
        assert all(b"\0" + switch.encode() + b"\0" in binary for switch in ONECCL_SWITCHES)


def test_simulated_cpu_devices_leave_xla_threads_for_collectives_to_wait_in():
    """XLA's CPU thread pools, one thread a device by default, grow to four a device where agx
    simulates devices, unless the user sized them; flags already asking for the count are left
    as they were (JAX's compilation cache keys them). The thread count of a started JAX shows that
    this jaxlib reads the variable."""
    from agx.runtime import simulate_cpu_devices

    env = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8"}
    simulate_cpu_devices(8, env)
    assert env == {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8",
                   "PJRT_NPROC": str(max(32, os.cpu_count()))}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false", "NPROC": "3"}
    simulate_cpu_devices(2, env)
    assert env == {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=2",
                   "NPROC": "3"}
    threads = "import os, jax; jax.devices(); print(len(os.listdir('/proc/self/task')))"
    started = lambda **env: int(subprocess.run([sys.executable, "-c", threads], capture_output=True, text=True,
                                               check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}).stdout)
    sized = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    simulate_cpu_devices(8, sized)
    assert started(**sized) - started(XLA_FLAGS=sized["XLA_FLAGS"], PJRT_NPROC="1") >= 3 * 8


def test_the_gpu_job_scripts_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts every process at start on a flag it does not know: each of the flags that
    tools/jobs/slurm_gpu.sbatch sets starts JAX here (both stacks' jaxlibs parse every backend's flags),
    and a misspelt one would not."""
    script = (Path(__file__).resolve().parent.parent / "tools" / "jobs" / "slurm_gpu.sbatch").read_text()
    flags = [line.strip() for line in script.splitlines() if line.strip().startswith("--xla_gpu_")]
    assert len(flags) == 8, flags
    starts = lambda flags: subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                                          text=True, env={**os.environ, "XLA_FLAGS": " ".join(flags)}, timeout=120)
    assert starts(flags).returncode == 0, starts(flags).stderr
    misspelt = starts([*flags, "--xla_gpu_enable_latency_hiding_schedular=true"])
    assert misspelt.returncode != 0 and "xla_gpu_enable_latency_hiding_schedular" in misspelt.stderr


def test_tensor_groups_that_straddle_hosts_are_found():
    from types import SimpleNamespace

    from agx.parallel.mesh import tensor_groups_across_hosts

    # Two Aurora nodes, one tile per process, ranks placed node by node (as mpiexec --ppn 12 does).
    devices = np.array([SimpleNamespace(process_index=rank) for rank in range(24)], dtype=object)
    hosts = ["x1"] * 12 + ["x2"] * 12

    def mesh(fsdp, tensor):
        return SimpleNamespace(devices=devices.reshape(1, 1, fsdp, 1, tensor),
                               shape={"pipeline": 1, "data": 1, "fsdp": fsdp, "context": 1, "tensor": tensor})

    assert tensor_groups_across_hosts(mesh(3, 8), hosts) == [{"x1", "x2"}]  # ranks 8-15
    assert tensor_groups_across_hosts(mesh(2, 12), hosts) == []
    assert tensor_groups_across_hosts(mesh(4, 6), hosts) == []


# --- the rendezvous refuses what is not of the job -----------------------------------------------

RENDEZVOUS = """
import os
from agx.config import RuntimeConfig
from agx.runtime.launchers import discover
from agx.runtime.rendezvous import rendezvous
p = discover(RuntimeConfig(), os.environ)
rendezvous(p, 60)
print("joined", p.process_id, flush=True)
"""


def test_a_check_in_without_the_jobs_token_is_refused_and_the_job_still_starts():
    """Process 0 listens; two strangers check in as process 1 (no token, another job's token) and 20
    more connect and say nothing, before the real process 1 checks in. The first two are hung up on
    unanswered, the silent ones hold up nothing, and the real job meets."""
    import socket

    from agx.launch import child_env

    port = free_port()
    start = lambda rank: subprocess.Popen([sys.executable, "-c", RENDEZVOUS], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          env=child_env(rank, 2, port, "token-of-this-job", None))
    job, silent = [start(0)], []
    try:
        for hello in [{"process_id": 1, "num_processes": 2},
                      {"process_id": 1, "num_processes": 2, "job_token": "0" * 32}]:
            deadline = time.monotonic() + 30
            while True:
                try:
                    stranger = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline and job[0].poll() is None, job[0].communicate()
                    time.sleep(0.1)
            with stranger:
                stranger.sendall(json.dumps(hello).encode() + b"\n")
                assert stranger.recv(4096) == b""  # closed, with no answer
        # 20 connections that say nothing, held open (5 s each, one after another, outlasted the wait)
        silent += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        job.append(start(1))
        for rank, process in enumerate(job):
            out, err = process.communicate(timeout=90)
            assert process.returncode == 0 and out.split() == ["joined", str(rank)], err
    finally:
        for connection in silent:
            connection.close()
        for process in job:
            process.kill()


# --- every process hears every answer, or all stop ------------------------------------------------

AGREEMENT = """
import os, sys, time
import jax
rank = int(sys.argv[1])
jax.distributed.initialize(sys.argv[2], 2, rank, initialization_timeout=60)
from agx.errors import RunError
from agx.runtime.agreement import every_process_says
print(every_process_says("which step it can read", 10 - rank, 30), flush=True)
if rank == 1:  # it hangs (a stuck file system) instead of answering the second question
    time.sleep(12)
    os._exit(0)
started = time.monotonic()
try:
    every_process_says("whether it can read checkpoint step 10", True, 3)
except RunError as e:
    print(f"{time.monotonic() - started:.0f} s: {e}", flush=True)
os._exit(0)
"""


def test_processes_hear_each_others_answers_and_stop_when_one_does_not_answer_in_time():
    coordinator = f"127.0.0.1:{free_port()}"
    job = [subprocess.Popen([sys.executable, "-c", AGREEMENT, str(rank), coordinator], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(1)) for rank in (0, 1)]
    said = [process.communicate(timeout=90)[0].splitlines() for process in job]
    assert said[1] == ["[10, 9]"], said
    assert said[0] == ["[10, 9]", "3 s: process 1 did not say within runtime.init_timeout_s=3 s whether it can "
                       "read checkpoint step 10 (is its file system hung?); every process stops"], said
