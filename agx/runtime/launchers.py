"""Who this process is in a multi-process job, read from whichever launcher started it.

In order: explicit `runtime.*` settings and `AGX_*` variables (set by `python -m agx.launch`), Cray
PALS and PMI (Aurora's `mpiexec`, MPICH, Intel MPI), OpenMPI, SLURM. Every process of a job must
derive the same coordinator: on one node it is 127.0.0.1; across nodes it is the first host of the
job (the PBS node file, or SLURM's node list) at a port derived from the job id, unless
AGX_COORDINATOR says otherwise.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from agx.config import RuntimeConfig
from agx.errors import UserError

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 61234  # without a job id to derive one from
JOB_ID_VARIABLES = ("AGX_JOB_TOKEN", "PBS_JOBID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid", "PMI_JOBID")


@dataclass(frozen=True)
class Processes:
    launcher: str  # "single" when no launcher is present
    num_processes: int
    process_id: int
    local_rank: int = 0
    local_size: int = 1
    coordinator: str | None = None  # host:port
    job_token: str = ""  # what every process of this job knows and a stray connection does not

    @property
    def coordinator_host(self) -> str:
        return self.coordinator.rpartition(":")[0].strip("[]")

    @property
    def coordinator_port(self) -> int:
        return int(self.coordinator.rpartition(":")[2])

    def __str__(self) -> str:
        return f"process {self.process_id} of {self.num_processes} ({self.launcher})"


def discover(cfg: RuntimeConfig, env: Mapping[str, str]) -> Processes:
    """This process's place in the job; `runtime.*` settings override what the launcher says."""
    found = next((p for p in (read(env) for read in LAUNCHERS) if p is not None),
                 Processes("single", 1, 0, coordinator=None))
    explicit = {k: getattr(cfg, k) for k in ("num_processes", "process_id", "coordinator")
                if getattr(cfg, k) is not None}
    if explicit:
        found = replace(found, launcher="runtime settings" if found.launcher == "single" else found.launcher,
                        **explicit)
    return _checked(replace(found, job_token=job_token(env, found)))


def job_token(env: Mapping[str, str], p: Processes) -> str:
    """The job's identity at the rendezvous: a digest of the launcher's job id (agx.launch makes
    a random one per job) with the coordinator. Every process of a job derives the same token; a
    process of another job, or a port scanner, does not. (Not the process count: processes that
    disagree on it are the job's own, and must hear why they cannot start.)"""
    job = next((f"{name}={env[name]}" for name in JOB_ID_VARIABLES if env.get(name)), "")
    return hashlib.sha256(f"{job}|{p.coordinator}".encode()).hexdigest()[:32]


def _checked(p: Processes) -> Processes:
    if p.num_processes < 1:
        raise UserError(f"{p.launcher}: the number of processes must be at least 1, not {p.num_processes}")
    if not 0 <= p.process_id < p.num_processes:
        raise UserError(f"{p.launcher}: process id {p.process_id} is outside 0..{p.num_processes - 1}")
    if p.num_processes == 1:
        return p
    if p.coordinator is None:
        raise UserError(f"{p}: no coordinator address; set AGX_COORDINATOR=host:port (or runtime.coordinator) "
                        "to process 0's host and a free port")
    host, _, port = p.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"coordinator address {p.coordinator!r} is not host:port with a port in 1..65535")
    return p


def _int(env: Mapping[str, str], *names: str) -> int | None:
    """The first of `names` that is set, as an integer."""
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise UserError(f"{name}={env[name]!r} is not an integer") from None
    return None


def _coordinator(env: Mapping[str, str], single_node: bool) -> str | None:
    if env.get("AGX_COORDINATOR"):
        return env["AGX_COORDINATOR"]
    port = _int(env, "AGX_COORDINATOR_PORT") or _port_for_job(env)
    host = LOOPBACK if single_node else _first_host(env)
    return f"{host}:{port}" if host else None


def _port_for_job(env: Mapping[str, str]) -> int:
    """Two jobs that share a node get different ports."""
    for name in ("PBS_JOBID", "SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid"):
        digits = re.match(r"\d+", env.get(name, ""))
        if digits:
            return 20000 + int(digits.group()) % 40000
    return DEFAULT_PORT


def _first_host(env: Mapping[str, str]) -> str | None:
    if env.get("PBS_NODEFILE") and Path(env["PBS_NODEFILE"]).is_file():
        lines = Path(env["PBS_NODEFILE"]).read_text().split()
        return lines[0] if lines else None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    return first_of_nodelist(nodelist) if nodelist else None


def first_of_nodelist(nodelist: str) -> str:
    """The first host of a SLURM host list: 'nid[0012-0015,0020],gpu7' -> 'nid0012'."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    return match.group(1) + (match.group(2) or "")


def _tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """SLURM_TASKS_PER_NODE ('4(x2),3') for node number `node`."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def _from_agx(env):
    size, rank = _int(env, "AGX_NUM_PROCESSES"), _int(env, "AGX_PROCESS_ID")
    if size is None and rank is None:
        return None
    size = 1 if size is None else size
    rank = 0 if rank is None else rank
    local_size = _int(env, "AGX_LOCAL_SIZE") or size
    return Processes("AGX_* variables", size, rank, _int(env, "AGX_LOCAL_RANK") or 0, local_size,
                     env.get("AGX_COORDINATOR") or None)


def _from_pals_or_pmi(env):
    """Cray PALS (Aurora's mpiexec) sets PALS_* and PMI_*; MPICH's and Intel MPI's Hydra set PMI_*."""
    rank, size = _int(env, "PALS_RANKID", "PMI_RANK"), _int(env, "PMI_SIZE")
    if rank is None or size is None:
        return None
    local_rank = _int(env, "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK", "MPI_LOCALRANKID") or 0
    local_size = _int(env, "PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE", "MPI_LOCALNRANKS") or 1
    launcher = "Cray PALS" if "PALS_RANKID" in env else "PMI"
    return Processes(launcher, size, rank, local_rank, local_size, _coordinator(env, local_size == size))


def _from_openmpi(env):
    rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    if rank is None or size is None:
        return None
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1
    return Processes("OpenMPI", size, rank, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, local_size,
                     _coordinator(env, local_size == size))


def _from_slurm(env):
    # An srun step's own count first: a batch script's SLURM_NTASKS counts the whole allocation.
    rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if rank is None or size is None:
        return None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    local_size = _tasks_on_node(per_node, _int(env, "SLURM_NODEID") or 0) or 1
    return Processes("SLURM", size, rank, _int(env, "SLURM_LOCALID") or 0, local_size,
                     _coordinator(env, local_size == size))


LAUNCHERS = (_from_agx, _from_pals_or_pmi, _from_openmpi, _from_slurm)
