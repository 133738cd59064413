"""Spawning a server process in its own process group, and stopping the whole group.

`ProcessBackend` is the small interface the supervisor uses, so a Ray backend can replace the
local one without touching supervision.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from sdp_cli.launcher.guard import group_members, remove_shared_memory, shared_memory_segments


@dataclass
class LaunchSpec:
    index: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    # Cores the process (and every process and thread it starts) may run on; empty: any.
    cpu_cores: list[int] = field(default_factory=list)


@dataclass
class ServerProcess:
    spec: LaunchSpec
    pid: int
    pgid: int
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # The shared-memory segments its group had mapped when last looked at, removed when it is
    # stopped: a server that crashed can no longer be asked which they were.
    shared_memory: set[str] = field(default_factory=set, repr=False)

    def remember_shared_memory(self) -> None:
        self.shared_memory |= shared_memory_segments(group_members(self.pgid))

    def poll(self) -> int | None:
        """Exit code, or None while it runs."""
        if self.popen is not None:
            return self.popen.poll()
        return None if pid_alive(self.pid) else -1


class ProcessBackend(Protocol):
    def start(self, spec: LaunchSpec) -> ServerProcess: ...

    def stop(self, proc: ServerProcess, grace_s: float) -> None: ...


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: they are dead, and
    an orphaned one may wait a while for its reaper."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_is_running(proc) for proc in psutil.process_iter(["pid"]) if _pgid(proc) == pgid)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_of(owner: int, pgids: Iterable[int]) -> list[psutil.Process]:
    """Every process a run's owner started, the owner itself excluded: its descendants and every
    member of its servers' process groups (`pgids`, from the registry), which a SIGKILLed owner
    no longer parents. The crash tests and scripts/chaos.py look for orphans with it."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        found.update({p.pid: p for p in psutil.Process(owner).children(recursive=True)})
    groups = set(pgids)
    for proc in psutil.process_iter():
        if _pgid(proc) in groups:
            found[proc.pid] = proc
    found.pop(owner, None)
    return list(found.values())


def still_running(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that still run (not exited, not a zombie, pid not reused)."""
    living = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and _is_running(proc):
                living.append(proc)
    return living


# Runs a command so that its process group dies with this process (see the file).
GUARD_SCRIPT = Path(__file__).with_name("guard.py")


def guarded(command: list[str], owner: int | None = None) -> list[str]:
    """`command` behind the guard: it keeps its pid, and the watchdog the guard leaves in its
    process group kills the group once `owner` (default: this process) has exited."""
    owner = os.getpid() if owner is None else owner
    return [sys.executable, str(GUARD_SCRIPT), str(owner), "--", *command]


class LocalProcessBackend:
    """Servers as child processes of this one, each the leader of a new session/process group
    so that one signal reaches vLLM's engine-core children too, and each behind the guard so
    that the group dies with this process even when it is killed with SIGKILL."""

    def start(self, spec: LaunchSpec) -> ServerProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            popen = subprocess.Popen(
                guarded(spec.command),
                env=spec.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if spec.cpu_cores:
            # Set before the interpreter it runs gets far enough to start threads or vLLM's
            # engine processes, all of which inherit it (a preexec_fn would do the same but is
            # unsafe when the parent has threads, as the supervisor does).
            os.sched_setaffinity(popen.pid, spec.cpu_cores)
        return ServerProcess(spec=spec, pid=popen.pid, pgid=popen.pid, popen=popen)

    def stop(self, proc: ServerProcess, grace_s: float) -> None:
        """Stop the group, then unlink the shared memory it leaves (a process killed with
        SIGKILL, or one that crashed, cannot unlink its own)."""
        proc.remember_shared_memory()
        stop_process_group(proc.pgid, grace_s, reap=proc.poll)
        if proc.popen is not None:
            # Reap the child; the group is already signalled, so a timeout only means a zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(grace_s, 1.0))
        if not group_alive(proc.pgid):
            remove_shared_memory(proc.shared_memory)


def stop_process_group(pgid: int, grace_s: float, reap: Callable[[], object] | None = None) -> None:
    """SIGTERM the group, wait up to `grace_s`, then SIGKILL whatever is left. `reap` (the
    leader's poll) is called while waiting so that our own child does not linger as a zombie."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_for_group_exit(pgid, grace_s, reap):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_for_group_exit(pgid, 5.0, reap)


def _wait_for_group_exit(pgid: int, timeout_s: float, reap: Callable[[], object] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if reap is not None:
            reap()
        if not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1", start: int = 0, taken: set[int] | None = None) -> int:
    """A port nothing listens on. With start=0 the OS picks; otherwise the first free one from
    `start` upwards, skipping `taken` (ports handed to servers that have not bound yet)."""
    taken = taken or set()
    if start == 0:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if port not in taken:
                return port
    for port in range(start, 65536):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port from {start}")
