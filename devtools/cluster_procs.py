"""Detached control-plane processes: start, record, check and stop them by pid file.

Each component runs in its own session (so its own process group) with output in a log file,
so it outlives the `make cluster` or pytest process that started it. A pid file alone is not
trusted: the pid must still be alive *and* run the binary we started, because pids are reused
and a stale file must never make us signal somebody else's process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Component:
    """One control-plane process as recorded in the state directory."""

    name: str
    pid_file: Path
    log_file: Path
    binary: Path


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so the kernel cannot repeat one)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(component: Component, args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Start ``binary args...`` detached; returns its pid (also written to the pid file).

    posix_spawn rather than subprocess.Popen: a Popen object for a process meant to outlive us
    warns "still running" when collected, and we never wait for these processes.
    """
    component.log_file.parent.mkdir(parents=True, exist_ok=True)
    component.pid_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(component.binary), *args]
    pid = os.posix_spawn(
        argv[0],
        argv,
        dict(os.environ if env is None else env),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(component.log_file), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    component.pid_file.write_text(f"{pid}\n")
    return pid


def _reap(pid: int) -> None:
    # Only our own children can be reaped; others are reaped by init once they exit.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def read_pid(component: Component) -> int | None:
    try:
        return int(component.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _runs_binary(pid: int, binary: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, _, rest = stat.partition(" (")[2].rpartition(")")
    # A zombie (state Z) has exited; its parent just has not reaped it yet.
    if rest.split()[0] == "Z":
        return False
    if cmdline and cmdline[0]:
        return cmdline[0] == str(binary).encode()
    # Just spawned: the kernel shows an empty cmdline for a moment; the command name (first
    # 15 bytes of the file name) is already there.
    return comm == binary.name[:15]


def alive_pid(component: Component) -> int | None:
    """The recorded pid if that process is alive and is still our binary, else None."""
    pid = read_pid(component)
    if pid is None or not _runs_binary(pid, component.binary):
        return None
    return pid


def _wait_gone(pid: int, binary: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _runs_binary(pid, binary):
        _reap(pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(components: Sequence[Component], grace_seconds: float = 10.0) -> None:
    """SIGTERM the components' process groups together, SIGKILL what outlives the grace period."""
    running = [(c, pid) for c in components if (pid := alive_pid(c)) is not None]
    for _, pid in running:
        # The whole group: a component's helpers (if any) go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for comp, pid in running:
        if not _wait_gone(pid, comp.binary, max(0.0, deadline - time.monotonic())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_gone(pid, comp.binary, 5.0)
    for comp in components:
        comp.pid_file.unlink(missing_ok=True)


def log_tail(component: Component, lines: int = 30) -> str:
    """The end of a component's log, for error messages when it fails to start."""
    try:
        text = component.log_file.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
