"""The runtime, started before anything touches a JAX backend: which platform, which processes,
and which of the node's devices this process drives.

`start` reads the launcher's environment (agx/runtime/launchers.py), checks in with the other
processes (agx/runtime/rendezvous.py), then calls `jax.distributed.initialize`. On CPUs the
processes' collectives go through gloo; each process's device count comes from
AGX_DEVICES_PER_PROCESS. On GPUs with several processes per node, each process takes
AGX_DEVICES_PER_PROCESS devices (default 1) by its local rank, unless CUDA_VISIBLE_DEVICES or
ZE_AFFINITY_MASK already chose.
"""

from __future__ import annotations

import os
import re
import sys

from agx.config import RuntimeConfig
from agx.errors import RunError, UserError
from agx.runtime.launchers import Processes, discover
from agx.runtime.platform import choose_platform, silence_plugin_failure, started_platform
from agx.runtime.rendezvous import bind_address, rendezvous

__all__ = ["Processes", "choose_platform", "silence_plugin_failure", "simulate_cpu_devices", "start"]


# The Intel plugin (0.7.0) reads these switches when it builds its collectives API
# (xla::gpu::CclApi::CclApi in pjrt_plugin_xpu.so), each through tsl::ReadBoolFromEnvVar with the
# default false, and initialises oneCCL only when one of them is set: read from the binary's
# code, not yet tried on an Intel GPU. A job of several processes needs its collectives to cross
# them, so agx sets each to 1 there; a value already in the environment is kept.
ONECCL_SWITCHES = ("COLLECTIVE_USE_ONECCL", "ALLREDUCE_USE_ONECCL", "BROADCAST_USE_ONECCL", "ALLGATHER_USE_ONECCL",
                   "REDUCESCATTER_USE_ONECCL", "ALLTOALL_USE_ONECCL", "COLLECTIVEPERMUTE_USE_ONECCL",
                   "SENDRECV_USE_ONECCL")


def collectives_environment(platform: str, num_processes: int, env) -> None:
    """Sets ONECCL_SWITCHES in `env` (before JAX loads the plugin) for a job of several processes
    that may run on the Intel plugin (`runtime.platform` xpu or auto)."""
    if num_processes > 1 and platform in ("auto", "xpu"):
        for switch in ONECCL_SWITCHES:
            env.setdefault(switch, "1")


def start(cfg: RuntimeConfig, env=os.environ) -> Processes:
    """Chooses the platform and joins the job; returns this process's place in it."""
    processes = discover(cfg, env)
    collectives_environment(cfg.platform, processes.num_processes, env)
    choose_platform(cfg.platform)
    per_process = _devices_per_process(env)
    simulated = per_process or _simulated_cpu_devices(env)
    if per_process or simulated > 1:
        simulate_cpu_devices(simulated, env)  # read by the CPU backend only
    if processes.num_processes > 1:
        _join(cfg, processes, per_process, env)
    platform = started_platform(cfg.platform)
    if processes.process_id == 0:
        import jax

        took = f"; auto took {platform}" if cfg.platform == "auto" else ""
        jobs = f"{processes.num_processes} processes ({processes.launcher}), " if processes.num_processes > 1 else ""
        print(f"agx: runtime: {jobs}{jax.device_count()} {platform} devices{took}", file=sys.stderr)
    return processes


def _join(cfg: RuntimeConfig, processes: Processes, per_process: int | None, env) -> None:
    rendezvous(processes, cfg.init_timeout_s)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local_device_ids = None
    if processes.local_size > 1 and not env.get("CUDA_VISIBLE_DEVICES") and not env.get("ZE_AFFINITY_MASK"):
        first = processes.local_rank * (per_process or 1)
        local_device_ids = list(range(first, first + (per_process or 1)))  # ignored on CPUs
    try:
        jax.distributed.initialize(processes.coordinator, processes.num_processes, processes.process_id,
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=cfg.init_timeout_s,
                                   coordinator_bind_address=bind_address(processes))
    except Exception as e:  # noqa: BLE001 - JAX's reasons vary by version; the first line says it
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{processes}: jax.distributed.initialize failed ({reason})") from None
    if jax.process_count() != processes.num_processes:
        raise UserError(f"{processes}: JAX's coordinator started {jax.process_count()} processes")


def _devices_per_process(env) -> int | None:
    text = env.get("AGX_DEVICES_PER_PROCESS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"AGX_DEVICES_PER_PROCESS={text!r} must be a positive integer")
    return int(text)


COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\S+)")
THREADS_PER_SIMULATED_DEVICE = 4


def simulate_cpu_devices(count: int, env=os.environ) -> None:
    """Asks XLA's CPU backend for `count` devices; call it before JAX starts a backend.

    It also gives XLA's CPU thread pools THREADS_PER_SIMULATED_DEVICE threads a device (PJRT_NPROC),
    unless PJRT_NPROC or NPROC already says. XLA sizes them at one a device, or one a core where
    there are more cores. But a device can wait in two collectives at once, as its independent
    operations run concurrently, and a waiting participant holds a thread. On a machine with
    fewer cores than devices, a pipelined step deadlocked so (jax 0.10.2, 2 cores, 8 devices):
    seven devices waited in a collective-permute and one in an all-gather; that took the eight
    threads, and the eighth device, which all of them waited for, never ran."""
    flags = env.get("XLA_FLAGS", "")
    if _simulated_cpu_devices(env) != count:  # flags left as they were keep JAX's compilation cache keys
        kept = COUNT_FLAG.sub("", flags).split()
        env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])
    if "PJRT_NPROC" not in env and "NPROC" not in env:
        env["PJRT_NPROC"] = str(max(THREADS_PER_SIMULATED_DEVICE * count, os.cpu_count() or 1))


def _simulated_cpu_devices(env) -> int:
    """The device count XLA_FLAGS asks of the CPU backend (the last one given), else 1."""
    counts = COUNT_FLAG.findall(env.get("XLA_FLAGS", ""))
    return int(counts[-1]) if counts and counts[-1].isdigit() else 1
