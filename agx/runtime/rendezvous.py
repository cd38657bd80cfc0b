"""A check-in of every process with process 0, before JAX's own start.

`jax.distributed.initialize` meets a wrong port or a process-count mismatch by aborting the process
with a C++ stack dump (or, for some mismatches, by starting a job of the wrong size). Here each
process first sends process 0 its id and the process count it expects, over one TCP connection to
the coordinator's address, with the job's token (agx.runtime.launchers.job_token); process 0
refuses a check-in without it, checks that the others agree and answers everyone. A mistake is one
line on every process within `timeout_s`. Process 0 then closes the port for JAX's coordinator.
"""

from __future__ import annotations

import hmac
import json
import selectors
import socket
import time

from agx.errors import UserError
from agx.runtime.launchers import LOOPBACK, Processes

RETRY_S = 0.25
HELLO_S = 5  # how long a connection to process 0 may take to say which process it is


def bind_address(processes: Processes) -> str:
    """Where process 0 listens: the coordinator's own address (the loopback address when the job is
    on this machine alone), never every interface of the host."""
    host = processes.coordinator_host
    if host == "localhost":
        host = LOOPBACK
    if ":" in host:  # an IPv6 address already
        return f"[{host}]:{processes.coordinator_port}"
    try:
        host = socket.gethostbyname(host)
    except OSError as e:
        raise UserError(f"{processes}: the coordinator host {host!r} does not resolve ({e})") from None
    return f"{host}:{processes.coordinator_port}"


def rendezvous(processes: Processes, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    if processes.process_id == 0:
        _host(processes, deadline, timeout_s)
    else:
        _join(processes, deadline, timeout_s)


def _host(p: Processes, deadline: float, timeout_s: float) -> None:
    host, _, port = bind_address(p).rpartition(":")
    host = host.strip("[]")
    try:
        server = socket.create_server((host, int(port)))
    except OSError as e:
        raise UserError(f"{p}: cannot listen on {host}:{port} for the other processes ({e.strerror})") from None
    arrived: dict[int, socket.socket] = {}
    extra: list[socket.socket] = []  # second claimants of an id, told the same answer
    problems: list[str] = []
    with server:
        for connection, hello in _check_ins(server, deadline, p.job_token):
            rank, expected = hello["process_id"], hello["num_processes"]
            if expected != p.num_processes:
                problems.append(f"process {rank} expects {expected} processes, process 0 expects {p.num_processes}")
            elif not 0 < rank < p.num_processes or rank in arrived:
                problems.append(f"two processes claim process id {rank}" if rank in arrived
                                else f"a process claims id {rank}, outside 1..{p.num_processes - 1}")
            if rank in arrived:
                extra.append(connection)
            else:
                arrived[rank] = connection
            if len(arrived) == p.num_processes - 1 or problems:
                break
        missing = sorted(set(range(1, p.num_processes)) - set(arrived))
        if not problems and missing:
            problems.append(f"process{'es' if len(missing) > 1 else ''} {_ranges(missing)} did not reach the "
                            f"coordinator {p.coordinator} within {timeout_s:g}s")
        answer = {"error": "; ".join(problems)} if problems else {"ok": True}
        for connection in [*arrived.values(), *extra]:
            with connection:
                try:
                    connection.sendall(json.dumps(answer).encode() + b"\n")
                    connection.settimeout(5)
                    connection.recv(1)  # until they hang up, so the port is free again at once
                except OSError:
                    pass
    if problems:
        raise UserError(f"{p}: the processes disagree: {answer['error']}")


def _join(p: Processes, deadline: float, timeout_s: float) -> None:
    host, port = p.coordinator_host, p.coordinator_port
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UserError(f"{p}: could not reach the coordinator {p.coordinator} within {timeout_s:g}s; "
                            "is process 0 running, with the same coordinator address and port?")
        try:
            connection = socket.create_connection((host, port), timeout=min(remaining, 5))
            break
        except socket.gaierror as e:
            raise UserError(f"{p}: the coordinator host {host!r} does not resolve ({e.strerror})") from None
        except OSError:
            time.sleep(min(RETRY_S, max(remaining, 0)))
    with connection:
        try:
            connection.sendall(json.dumps({"process_id": p.process_id, "num_processes": p.num_processes,
                                           "job_token": p.job_token}).encode() + b"\n")
            answer = _read(connection, deadline)
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: the coordinator {p.coordinator} gave no answer within {timeout_s:g}s "
                            f"({e}); is process 0 running, and is the port agx's?") from None
    if "error" in answer:
        raise UserError(f"{p}: the processes disagree: {answer['error']}")


def _read(connection: socket.socket, deadline: float) -> dict:
    """One JSON line, before the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        connection.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = connection.recv(4096)
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
        if len(data) > 65536:
            raise ValueError("answer too long")
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not an object")
    return message


def _check_ins(server: socket.socket, deadline: float, token: str):
    """(connection, hello) for each connection that says within HELLO_S, in one JSON line, a process
    id and count with the job's token; any other is closed unanswered. Connections are read side by
    side, so a silent or slow one (a port scan, a stray client) holds up no other."""
    server.setblocking(False)
    unread: dict[socket.socket, list] = {}  # connection -> [what it sent so far, its deadline]
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                for key, _ in selector.select(min(deadline - time.monotonic(), 0.5)):
                    if key.fileobj is server:
                        try:
                            connection, _ = server.accept()
                        except BlockingIOError:
                            continue
                        connection.setblocking(False)
                        unread[connection] = [b"", time.monotonic() + HELLO_S]
                        selector.register(connection, selectors.EVENT_READ)
                        continue
                    connection = key.fileobj
                    try:
                        chunk = connection.recv(4096)
                    except OSError:
                        chunk = b""
                    unread[connection][0] += chunk
                    data = unread[connection][0]
                    if chunk and not data.endswith(b"\n") and len(data) <= 65536:
                        continue
                    selector.unregister(connection)
                    del unread[connection]
                    hello = _hello(data, token) if chunk else None
                    if hello is None:
                        connection.close()
                        continue
                    connection.setblocking(True)
                    yield connection, hello
                for connection in [c for c, (_, limit) in unread.items() if time.monotonic() > limit]:
                    selector.unregister(connection)
                    del unread[connection]
                    connection.close()
    finally:
        for connection in unread:
            connection.close()


def _hello(data: bytes, token: str) -> dict | None:
    """A check-in's line, if it is one of this job's; else None."""
    try:
        hello = json.loads(data)
        hello = {"process_id": int(hello["process_id"]), "num_processes": int(hello["num_processes"]),
                 "job_token": str(hello.get("job_token", ""))}
    except (ValueError, KeyError, TypeError):
        return None
    return hello if hmac.compare_digest(hello["job_token"], token) else None


def _ranges(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if len(ids) <= 8 else f"{', '.join(map(str, ids[:8]))} and {len(ids) - 8} more"
