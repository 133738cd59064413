"""Run a server command so that it cannot outlive the process that owns it.

    python guard.py OWNER_PID -- COMMAND...

The guard is started as the leader of a new process group. It forks a watchdog, then execs
COMMAND in place (so the server keeps the guard's pid, and every process the server starts, such
as vLLM's engine cores, stays in the group). The watchdog waits for OWNER_PID to exit, however
it exits (SIGKILL included), then terminates the whole group: SIGTERM, a short grace, SIGKILL.
When the owner stops the servers itself, the watchdog dies with the group like any member.

A parent-death signal would not do: it reaches only the direct child, and fires when the
parent *thread* that spawned the child exits, not the process. This file is run as a script
with the standard library only, so it starts in milliseconds and imports nothing of sdp.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

# How long the server group gets to exit on SIGTERM before it is killed.
GRACE_S = 3.0
# Poll interval where pidfd_open is unavailable (kernels before 5.3).
POLL_S = 0.25


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


def group_has_others(pgid: int) -> bool:
    """Whether a process other than this one still runs in group `pgid` (zombies excluded)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def terminate_group(pgid: int) -> None:
    """SIGTERM the group (sparing this process), wait up to GRACE_S, then SIGKILL it all."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and group_has_others(pgid):
        time.sleep(0.1)
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
