"""Server process groups die with their owner, however it dies (no vLLM: plain processes that
start children of their own, as vLLM's API server starts its engine cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sdp_cli.launcher.process import LaunchSpec, LocalProcessBackend, group_alive

# A "server" that starts a child of its own and then waits, printing both pids.
SERVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"child": child.pid}), flush=True)
    time.sleep(600)
    """
)

# An owner that starts two guarded servers, writes what it started, and waits to be killed.
OWNER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from sdp_cli.launcher.process import LaunchSpec, LocalProcessBackend
    out = Path(sys.argv[1])
    started = []
    for index in range(2):
        spec = LaunchSpec(index, [sys.executable, "-c", sys.argv[2]], dict(os.environ),
                          out / f"server-{index}.log", 0)
        proc = LocalProcessBackend().start(spec)
        started.append({"pid": proc.pid, "pgid": proc.pgid})
    (out / "started.json").write_text(json.dumps(started))
    time.sleep(600)
    """
)


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def grandchild_pid(log: Path) -> int | None:
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("{"):
            return int(json.loads(line)["child"])
    return None


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_servers_and_their_children_die_within_10_s_of_their_owner(
    tmp_path: Path, how: signal.Signals
) -> None:
    """SIGTERM kills an owner that installed no handler just as SIGKILL does: no `finally`
    runs, so only the guard's watchdog can stop the servers."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), SERVER])
    started_file = tmp_path / "started.json"
    try:
        assert wait_until(started_file.exists, 30), "the owner did not start its servers"
        started = json.loads(started_file.read_text())
        logs = [tmp_path / f"server-{i}.log" for i in range(2)]
        assert wait_until(lambda: all(grandchild_pid(log) for log in logs), 30)
        children = [grandchild_pid(log) for log in logs]
        processes = [s["pid"] for s in started] + children
        assert all(running(pid) for pid in processes if pid)
        owner.send_signal(how)
        owner.wait(timeout=10)
        killed_at = time.monotonic()
        # Every process of each group, the watchdog included, is gone within 10 s.
        assert wait_until(
            lambda: (
                not any(running(p) for p in processes if p)
                and not any(group_alive(s["pgid"]) for s in started)
            ),
            10,
        )
        assert time.monotonic() - killed_at < 10
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_guarded_server_keeps_its_pid_and_a_normal_stop_is_not_delayed(tmp_path: Path) -> None:
    spec = LaunchSpec(0, [sys.executable, "-c", SERVER], dict(os.environ), tmp_path / "s.log", 0)
    backend = LocalProcessBackend()
    proc = backend.start(spec)
    assert wait_until(lambda: grandchild_pid(spec.log_path) is not None, 30)
    # The guard exec'd the server in place: same pid, and that pid leads the group.
    assert psutil.Process(proc.pid).cmdline() == spec.command
    assert os.getpgid(proc.pid) == proc.pid
    started = time.monotonic()
    backend.stop(proc, grace_s=5.0)
    # The watchdog dies on the group's SIGTERM like the server, so the grace is not waited out.
    assert time.monotonic() - started < 3.0
    assert not group_alive(proc.pgid)
    assert not running(grandchild_pid(spec.log_path) or 0)


# A "server" that keeps a shared-memory segment out of Python's resource tracker, as vLLM does
# with its message queues, so nothing unlinks it when the process is killed.
SHM_SERVER = textwrap.dedent(
    """
    import json, time
    from multiprocessing import shared_memory
    from unittest import mock
    with mock.patch("multiprocessing.resource_tracker.register", lambda *a, **k: None):
        segment = shared_memory.SharedMemory(create=True, size=1 << 20)
    print(json.dumps({"shm": "/dev/shm/" + segment.name}), flush=True)
    time.sleep(600)
    """
)


def shm_path(log: Path) -> Path | None:
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("{"):
            return Path(json.loads(line)["shm"])
    return None


def test_a_crashed_servers_shared_memory_is_unlinked_when_it_is_stopped(tmp_path: Path) -> None:
    command = [sys.executable, "-c", SHM_SERVER]
    spec = LaunchSpec(0, command, dict(os.environ), tmp_path / "s.log", 0)
    backend = LocalProcessBackend()
    proc = backend.start(spec)
    try:
        assert wait_until(lambda: shm_path(spec.log_path) is not None, 30)
        segment = shm_path(spec.log_path)
        assert segment is not None and segment.exists()
        proc.remember_shared_memory()
        assert str(segment) in proc.shared_memory
        # The server dies by SIGKILL, watchdog and all: nothing of its own unlinks the segment.
        os.killpg(proc.pgid, signal.SIGKILL)
        assert wait_until(lambda: not group_alive(proc.pgid), 10)
        assert segment.exists()
        backend.stop(proc, grace_s=1.0)
        assert not segment.exists()
    finally:
        backend.stop(proc, grace_s=1.0)


def test_the_guard_unlinks_the_shared_memory_of_servers_whose_owner_died(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), SHM_SERVER])
    try:
        assert wait_until((tmp_path / "started.json").exists, 30)
        logs = [tmp_path / f"server-{i}.log" for i in range(2)]
        assert wait_until(lambda: all(shm_path(log) for log in logs), 30)
        segments = [shm_path(log) for log in logs]
        assert all(segment is not None and segment.exists() for segment in segments)
        owner.kill()
        owner.wait(timeout=10)
        started = json.loads((tmp_path / "started.json").read_text())
        assert wait_until(lambda: not any(group_alive(s["pgid"]) for s in started), 10)
        assert not any(segment is not None and segment.exists() for segment in segments)
    finally:
        if owner.poll() is None:
            owner.kill()
