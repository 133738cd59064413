"""Fault injection on real vLLM CPU servers with the built-in model: processes are killed with
SIGKILL at chosen moments and directories become unwritable, and afterwards every data position
is trained exactly once, no trained sample broke the staleness bound, and no process of a killed
owner is left.

To stay within a few minutes on 2 cores the runs share servers: one `sdp launch-servers` fleet
serves every run that does not need its own server (resumes attach to it), and the last test
SIGKILLs that fleet's owner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from sdp_cli.common.atomic import is_leftover
from sdp_cli.common.faults import HOLD_AT, HOLD_FILE
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import Event
from sdp_cli.launcher.guard import group_members, shared_memory_segments
from sdp_cli.launcher.process import group_alive, processes_of, still_running
from sdp_cli.orchestrator.run_state import latest_checkpoint
from sdp_cli.views.position_audit import audit_positions

pytestmark = pytest.mark.vllm

SMALL = [
    "rollout.batch_size=4",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "rollout.max_concurrent=12",
    "rollout.max_staleness=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=1",
    "train.keep_weights=1",
]
STEPS = 8
Unwritable = Callable[[Path], AbstractContextManager[None]]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def events(run_dir: Path) -> list[Event]:
    path = run_dir / "events.jsonl"
    return list(read_events(path)) if path.exists() else []


def registry(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())["servers"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def sdp(command: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sdp_cli", command, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def sigkill_and_check_nothing_is_left(proc: subprocess.Popen, registry_path: Path) -> float:
    """SIGKILL `proc`; every process it started must be gone within 10 s. Returns the seconds
    it took."""
    groups = {s["pgid"] for s in registry(registry_path) if s.get("pgid")}
    owned = processes_of(proc.pid, groups)
    proc.kill()
    proc.wait(timeout=10)
    killed_at = time.monotonic()
    deadline = killed_at + 10
    while (
        still_running(owned) or any(group_alive(g) for g in groups)
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [" ".join(p.cmdline())[:80] for p in still_running(owned)]
    assert not left, f"processes outlived their SIGKILLed owner by 10 s: {left}"
    assert not any(group_alive(g) for g in groups)
    return time.monotonic() - killed_at


def kill_at(point: str, run_dir: Path, args: list[str], tmp_path: Path) -> None:
    """Run `sdp train` until it holds at `point` (POINT:N), then SIGKILL it there."""
    marker = tmp_path / f"held-{point.replace(':', '-')}-{time.monotonic_ns()}"
    proc = sdp(
        "train",
        *args,
        log=tmp_path / "train.log",
        env={HOLD_AT: point, HOLD_FILE: str(marker)},
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 400, f"hold at {point}")
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def train_to_the_end(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdp_cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_each_position_trained_once_within_the_bound(run_dir: Path, sessions: int) -> None:
    audit = audit_positions(events(run_dir))
    assert audit.finished and audit.sessions == sessions
    assert audit.trained == STEPS * 4
    assert audit.trained_twice == []
    assert audit.never_trained == []
    assert audit.over_bound == 0


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`sdp launch-servers` with one server, started at once and waited for only when a test
    attaches (meanwhile the first test starts its own server)."""
    run_dir = tmp_path_factory.mktemp("fleet")
    proc = sdp("launch-servers", f"run.dir={run_dir}", log=run_dir / "out.log")
    path = run_dir / "servers.json"

    def ready() -> Path:
        wait_for(
            lambda: any(s["state"] == "ready" for s in registry(path)) or proc.poll() is not None,
            400,
            "sdp launch-servers",
        )
        assert proc.poll() is None, (run_dir / "out.log").read_text()[-3000:]
        return path

    try:
        yield {"proc": proc, "ready": ready, "registry": path}
    finally:
        if proc.poll() is None:
            proc.kill()


def test_server_killed_twice_then_sdp_train_killed_during_generation(
    tmp_path: Path, shared_fleet: dict[str, Any]
) -> None:
    """Its own server is SIGKILLed twice: the supervisor restarts it and the run goes on. Then
    `sdp train` itself is SIGKILLed while it waits for rollouts: its server group (API server,
    engine core, watchdog) is gone within 10 s, and no shared-memory segment of any of the three
    server groups is left in /dev/shm. The run resumes on the shared fleet and finishes; the
    positions are trained exactly once across both sessions."""
    run_dir = tmp_path / "run"
    args = [
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        *SMALL,
        "server.health_interval_s=0.5",
        # An update waits up to this long for rollouts stuck on the killed server (they wait for
        # its restart) before it goes on; 30 s instead of 120 keeps the test short.
        "train.update_timeout_s=30",
    ]
    marker = tmp_path / "held"
    proc = sdp(
        "train",
        *args,
        log=tmp_path / "train.log",
        env={HOLD_AT: "generation:6", HOLD_FILE: str(marker)},
    )
    servers = run_dir / "servers.json"

    def steps_done() -> int:
        return sum(1 for e in events(run_dir) if e.type == "train_step")

    def restarts() -> int:
        return max((s["restarts"] for s in registry(servers) if s["state"] == "ready"), default=-1)

    # What vLLM's processes share through /dev/shm, seen in each server group before its kill.
    segments: set[str] = set()

    def note_segments() -> None:
        segments.update(shared_memory_segments(group_members(registry(servers)[0]["pgid"])))

    try:
        for kill in (1, 2):
            wait_for(
                lambda k=kill: (
                    (restarts() == k - 1 and steps_done() >= 1) or proc.poll() is not None
                ),
                400,
                f"a ready server before kill {kill}",
            )
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            note_segments()
            os.kill(registry(servers)[0]["pid"], signal.SIGKILL)
            wait_for(
                lambda k=kill: restarts() == k or proc.poll() is not None, 400, f"restart {kill}"
            )
        wait_for(lambda: marker.exists() or proc.poll() is not None, 400, "hold at generation")
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        note_segments()
        took = sigkill_and_check_nothing_is_left(proc, servers)
        print(f"server group gone {took:.1f} s after SIGKILL of sdp train")
        assert segments, "vLLM's processes mapped no shared memory: nothing was checked"
        # Unlinked by the supervisor (after each restart) and by the guard (after the owner).
        assert not [path for path in segments if Path(path).exists()]
    finally:
        if proc.poll() is None:
            proc.kill()
    states = [e for e in events(run_dir) if e.type == "server_state"]
    assert [e.restarts for e in states if e.state == "restarting"] == [0, 1]
    assert max(e.restarts for e in states) == 2

    registry_path = shared_fleet["ready"]()
    resumed = train_to_the_end([*args, "resume=true", f"server.registry={registry_path}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_each_position_trained_once_within_the_bound(run_dir, sessions=2)


def test_killed_during_a_weight_update_and_a_checkpoint_write_then_a_failed_write_then_resumed(
    tmp_path: Path, shared_fleet: dict[str, Any], make_unwritable: Unwritable
) -> None:
    registry_path = shared_fleet["ready"]()
    run_dir = tmp_path / "run"
    args = [
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        *SMALL,
        f"server.registry={registry_path}",
    ]
    kill_at("weight_update:3", run_dir, args, tmp_path)
    resume = [*args, "resume=true"]
    # Resumed from step 2, it holds in the middle of writing step-4.
    kill_at("checkpoint_write:1", run_dir, resume, tmp_path)
    checkpoints = run_dir / "checkpoints"
    assert any(is_leftover(p) for p in checkpoints.iterdir()), "no half-written checkpoint"
    # The half-written checkpoint is not taken for a complete one.
    assert latest_checkpoint(run_dir) == checkpoints / "step-2"

    with make_unwritable(checkpoints):
        failed = train_to_the_end(resume)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "cannot write checkpoint" in failed.stderr
    assert "step-2' is intact" in failed.stderr and "resume=true" in failed.stderr
    assert "Traceback" not in failed.stderr
    state = json.loads((checkpoints / "step-2" / "state.json").read_text())
    assert state["step"] == 2

    finished = train_to_the_end(resume)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Sessions: killed in a weight update, killed in a checkpoint write, failed write, finished.
    assert_each_position_trained_once_within_the_bound(run_dir, sessions=4)
    resumed_from = [e.resumed_from_step for e in events(run_dir) if e.type == "run_started"]
    assert resumed_from == [0, 2, 2, 2]


def test_sigkill_of_launch_servers_leaves_no_server(shared_fleet: dict[str, Any]) -> None:
    shared_fleet["ready"]()
    took = sigkill_and_check_nothing_is_left(shared_fleet["proc"], shared_fleet["registry"])
    print(f"servers gone {took:.1f} s after SIGKILL of sdp launch-servers")
