"""`python -m agx.launch --nproc N [--devices-per-process K] -- COMMAND ...`

A one-machine launcher for development and tests, like torchrun: N processes on 127.0.0.1, each
told its place through AGX_* variables (agx/runtime/launchers.py), their output streamed with a
rank prefix. It fails fast: when a process fails, the others are stopped (SIGTERM, then SIGKILL
after --grace seconds) and the exit code is the failed process's. A stop signal to the launcher
goes to every process, so a training run saves and exits as one job.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

from agx.errors import UserError, cli_exit
from agx.runtime.launchers import LOOPBACK


def free_port() -> int:
    """A port free on the loopback address now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def child_env(rank: int, nproc: int, port: int, token: str, devices_per_process: int | None) -> dict:
    env = dict(os.environ, AGX_COORDINATOR=f"{LOOPBACK}:{port}", AGX_NUM_PROCESSES=str(nproc),
               AGX_PROCESS_ID=str(rank), AGX_LOCAL_RANK=str(rank), AGX_LOCAL_SIZE=str(nproc),
               AGX_JOB_TOKEN=token, PYTHONUNBUFFERED="1")
    if devices_per_process:
        env["AGX_DEVICES_PER_PROCESS"] = str(devices_per_process)
    return env


class Job:
    def __init__(self, command: list[str], nproc: int, devices_per_process: int | None, grace_s: float):
        self.grace_s = grace_s
        self.lock = threading.Lock()
        port, token = free_port(), secrets.token_hex(16)  # the job's identity at the rendezvous
        self.procs = []
        for rank in range(nproc):
            try:
                proc = subprocess.Popen(command, env=child_env(rank, nproc, port, token, devices_per_process),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                self.kill()
                raise UserError(f"cannot start {command[0]!r}: {e.strerror}") from None
            self.procs.append(proc)
        self.streams = [threading.Thread(target=self._stream, args=(rank, proc), daemon=True)
                        for rank, proc in enumerate(self.procs)]
        for thread in self.streams:
            thread.start()

    def _stream(self, rank: int, proc: subprocess.Popen) -> None:
        for line in iter(proc.stdout.readline, b""):
            with self.lock:
                sys.stdout.buffer.write(f"[{rank}] ".encode() + line.replace(b"\r", b"\n[%d] " % rank))
                sys.stdout.flush()

    def say(self, message: str) -> None:
        with self.lock:
            print(f"agx.launch: {message}", file=sys.stderr, flush=True)

    def wait(self) -> int:
        """0 when every process succeeds; else the first failure's code (128 + signal if killed)."""
        while True:
            codes = [proc.poll() for proc in self.procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                running = [r for r, c in enumerate(codes) if c is None]
                self.say(f"process {rank} {how}" + (f"; stopping process{'es' if len(running) > 1 else ''} "
                                                      f"{', '.join(map(str, running))}" if running else ""))
                self.stop()
                return 128 - code if code < 0 else code
            if all(code == 0 for code in codes):
                self._drain()
                return 0
            time.sleep(0.1)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL to each process's whole group (its loader workers too) after the grace."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(proc.poll() is None for proc in self.procs):
            time.sleep(0.05)
        self.kill()
        self._drain()

    def kill(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def _drain(self) -> None:
        for thread in self.streams:
            thread.join(timeout=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agx.launch", description=__doc__.split("\n\n")[1],
                                     usage="python -m agx.launch --nproc N [--devices-per-process K] -- COMMAND ...")
    parser.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    parser.add_argument("--devices-per-process", type=int, default=None, metavar="K",
                        help="devices each process drives: K simulated CPU devices, or GPUs [rank·K, (rank+1)·K)")
    parser.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                        help="after a failure, how long the others get to stop before SIGKILL (default 5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise UserError("no command to launch: give it after --, e.g. -- python -m agx.train --experiment gpt3_tiny")
        if args.nproc < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
            raise UserError("--nproc and --devices-per-process must be at least 1")
        job = Job(command, args.nproc, args.devices_per_process, args.grace)
    except UserError as e:
        return cli_exit(e)
    stops = 0

    def forward(signum, _frame):  # first signal: pass it on; second: stop everything now
        nonlocal stops
        stops += 1
        if stops == 1:
            job.signal_all(signum)
        else:
            job.kill()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
