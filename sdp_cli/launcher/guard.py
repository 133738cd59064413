"""Run a server command so that it cannot outlive the process that owns it.

    python guard.py OWNER_PID -- COMMAND...

The guard is started as the leader of a new process group. It forks a watchdog, then execs
COMMAND in place (so the server keeps the guard's pid, and every process the server starts, such
as vLLM's engine cores, stays in the group). The watchdog waits for OWNER_PID to exit, however
it exits (SIGKILL included), then terminates the whole group: SIGTERM, a short grace, SIGKILL.
When the owner stops the servers itself, the watchdog dies with the group like any member.
Before the final SIGKILL it unlinks the shared-memory segments the group had mapped (vLLM's
processes talk through /dev/shm/psm_* segments that a killed process never unlinks).

A parent-death signal would not do: it reaches only the direct child, and fires when the
parent *thread* that spawned the child exits, not the process. This file is run as a script
with the standard library only, so it starts in milliseconds and imports nothing of sdp.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

# How long the server group gets to exit on SIGTERM before it is killed.
GRACE_S = 3.0
# Poll interval where pidfd_open is unavailable (kernels before 5.3).
POLL_S = 0.25
# multiprocessing.shared_memory's segments. vLLM keeps them out of Python's resource tracker,
# so a process killed with SIGKILL leaves its segments (hundreds of MB of RAM each) behind.
SHARED_MEMORY_PREFIX = "/dev/shm/psm_"


def wait_for_exit(pid: int) -> None:
    """Return once process `pid` has exited (at once if it already has)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        _poll_for_exit(pid)
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(None):
            pass
    finally:
        os.close(fd)


def _poll_for_exit(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(POLL_S)


def group_members(pgid: int) -> list[int]:
    """The pids of the processes that run in group `pgid` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def group_has_others(pgid: int) -> bool:
    """Whether a process other than this one still runs in group `pgid` (zombies excluded)."""
    return any(pid != os.getpid() for pid in group_members(pgid))


def shared_memory_segments(pids: list[int]) -> set[str]:
    """The multiprocessing shared-memory segments (/dev/shm/psm_*) that `pids` have mapped and
    that are not unlinked yet."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle:
                lines = handle.readlines()
        except OSError:
            continue
        for line in lines:
            # address perms offset dev inode path; an unlinked file's path ends "(deleted)".
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) == 6 else ""
            if path.startswith(SHARED_MEMORY_PREFIX) and not path.endswith("(deleted)"):
                found.add(path)
    return found


def remove_shared_memory(segments: set[str]) -> None:
    """Unlink `segments`; processes still mapping one keep it until they exit."""
    for path in segments:
        with contextlib.suppress(OSError):
            os.unlink(path)


def terminate_group(pgid: int) -> None:
    """SIGTERM the group (sparing this process), wait up to GRACE_S, unlink the shared memory
    it had mapped, then SIGKILL it all."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    segments = shared_memory_segments(group_members(pgid))
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and group_has_others(pgid):
        time.sleep(0.1)
    # This watchdog dies in the SIGKILL below, so it cleans up first.
    remove_shared_memory(segments)
    # Kills this watchdog too, last.
    os.killpg(pgid, signal.SIGKILL)


def watchdog(owner: int, pgid: int) -> None:
    wait_for_exit(owner)
    terminate_group(pgid)
    os._exit(0)


def guard(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: guard.py OWNER_PID -- COMMAND...\n")
        sys.exit(2)
    owner = int(argv[0])
    command = argv[2:]
    pgid = os.getpgrp()
    if os.fork() == 0:
        # The watchdog keeps the default dispositions: when the owner stops the group itself,
        # its SIGTERM ends the watchdog with the rest.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.close(0)
        watchdog(owner, pgid)
    os.execvp(command[0], command)


if __name__ == "__main__":
    guard(sys.argv[1:])
