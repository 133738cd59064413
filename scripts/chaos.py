"""Fault injection on real vLLM CPU servers, longer than the test suite; prints one table.

    python scripts/chaos.py [--steps 24] [--server-kills 3] [--trainer-kills 6] [--seed 0]

Scenarios (the built-in tiny model and task, B = 4, η = 1):
- server kills: `sdp train` with its own server; the server is SIGKILLed --server-kills times
  at random moments; the run must complete.
- trainer kills: `sdp train` attached to an `sdp launch-servers` fleet is SIGKILLed
  --trainer-kills times, each time at a hold point picked at random (during generation, during
  a weight update, in the middle of a checkpoint write), then resumed; the last resume
  finishes.
- write failures: a resume whose weights directory, then one whose checkpoints directory, is
  made unwritable must exit 2 naming the path; the next resume finishes.
- owner kills: `sdp train` with its own server, then `sdp launch-servers`, SIGKILLed; every
  process they started must be gone within 10 s.

Per scenario: faults injected, runs completed, prompts trained twice, prompts never trained,
trained samples over the bound (head lag > η), orphan processes (alive 10 s after their owner
was SIGKILLed). Every vLLM start goes through the caller's lock: run it under
`flock /tmp/sdp-vllm.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdp_cli.common.faults import HOLD_AT, HOLD_FILE, POINTS
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import Event
from sdp_cli.launcher.process import group_alive, processes_of, still_running
from sdp_cli.views.position_audit import audit_positions

SMALL = [
    "rollout.batch_size=4",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "rollout.max_concurrent=12",
    "rollout.max_staleness=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=1",
    "train.keep_weights=1",
]
WAIT_S = 600.0


@dataclass
class Row:
    scenario: str
    faults: int = 0
    runs_completed: int = 0
    trained_twice: int = 0
    never_trained: int | str = 0
    over_bound: int = 0
    orphans: int = 0

    def add_audit(self, run_dir: Path) -> None:
        audit = audit_positions(read_events(run_dir / "events.jsonl"))
        self.trained_twice += len(audit.trained_twice)
        if audit.never_trained is None:
            self.never_trained = "unknown (no run_finished)"
        elif isinstance(self.never_trained, int):
            self.never_trained += len(audit.never_trained)
        self.over_bound += audit.over_bound


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos: timed out waiting for {what}")
        time.sleep(0.1)


def registry(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())["servers"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def events(run_dir: Path) -> list[Event]:
    path = run_dir / "events.jsonl"
    return list(read_events(path)) if path.exists() else []


def start(command: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sdp_cli", command, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run(args: list[str], log: Path) -> int:
    with log.open("ab") as out:
        return subprocess.run(
            [sys.executable, "-m", "sdp_cli", "train", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            timeout=WAIT_S,
        ).returncode


def sigkill_owner(proc: Any, registry_path: Path) -> int:
    """SIGKILL an owner; returns how many of its processes are alive 10 s later (then kills
    them, so one failure does not spoil the next scenario)."""
    groups = {s["pgid"] for s in registry(registry_path) if s.get("pgid")}
    owned = processes_of(proc.pid, groups)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while still_running(owned) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = still_running(owned)
    for orphan in left:
        orphan.kill()
    for group in groups:
        if group_alive(group):
            os.killpg(group, signal.SIGKILL)
    return len(left)


def kill_at(point: str, args: list[str], work: Path) -> bool:
    """Run until the hold point, SIGKILL there. False if the run finished first."""
    marker = work / f"held-{time.monotonic_ns()}"
    proc = start("train", args, work / "train.log", {HOLD_AT: point, HOLD_FILE: str(marker)})
    wait_for(lambda: marker.exists() or proc.poll() is not None, f"hold at {point}")
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def server_kills(work: Path, steps: int, kills: int, rng: random.Random) -> Row:
    row = Row("server SIGKILLed during sdp train")
    run_dir = work / "server-kills"
    servers = run_dir / "servers.json"
    args = [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        *SMALL,
        f"server.max_restarts={kills}",
        # An update waits up to this long for rollouts stuck on the killed server to settle
        # (they wait for its restart); 30 s instead of 120 keeps the scenario short.
        "train.update_timeout_s=30",
    ]
    proc = start("train", args, work / "train.log")

    def ready_with(restarts: int) -> bool:
        return any(s["state"] == "ready" and s["restarts"] == restarts for s in registry(servers))

    def steps_done() -> int:
        return sum(1 for e in events(run_dir) if e.type == "train_step")

    for kill in range(kills):
        wait_for(lambda k=kill: ready_with(k) or proc.poll() is not None, "a ready server")
        if proc.poll() is not None:
            break
        target = steps_done() + rng.randint(0, 2)
        wait_for(lambda t=target: steps_done() >= t or proc.poll() is not None, "a step")
        if proc.poll() is not None:
            break
        os.kill(registry(servers)[0]["pid"], signal.SIGKILL)
        row.faults += 1
    row.runs_completed += int(proc.wait(timeout=WAIT_S) == 0)
    restarts = max((s["restarts"] for s in registry(servers)), default=0)
    print(f"  server kills: {row.faults}, restarts in servers.json: {restarts}", flush=True)
    row.add_audit(run_dir)
    return row


def trainer_kills(work: Path, steps: int, kills: int, fleet: Path, rng: random.Random) -> Row:
    row = Row("sdp train SIGKILLed at a hold point, resumed")
    run_dir = work / "trainer-kills"
    args = [f"run.dir={run_dir}", f"train.steps={steps}", *SMALL, f"server.registry={fleet}"]
    for kill in range(kills):
        # Each moment in turn, at a random occurrence; the first kill comes after the first
        # checkpoint (step 3), so there is one to resume from.
        point = f"{POINTS[kill % len(POINTS)]}:{rng.randint(1, 3)}" if kill else "weight_update:5"
        resume = ["resume=true"] if kill else []
        if kill_at(point, [*args, *resume], work):
            row.faults += 1
            print(f"  killed at {point}", flush=True)
    row.runs_completed += int(run([*args, "resume=true"], work / "train.log") == 0)
    row.add_audit(run_dir)
    return row


def write_failures(work: Path, steps: int, fleet: Path) -> Row:
    row = Row("weights / checkpoints dir unwritable, resumed")
    run_dir = work / "write-failures"
    args = [f"run.dir={run_dir}", f"train.steps={steps}", *SMALL, f"server.registry={fleet}"]
    if not kill_at("generation:5", args, work):
        raise SystemExit(f"chaos: the run in {run_dir} ended before its hold point")
    for name in ("weights", "checkpoints"):
        with unwritable(run_dir / name):
            code = run([*args, "resume=true"], work / "train.log")
        row.faults += 1
        if code != 2:
            print(f"  {name} unwritable: exit {code}, expected 2", flush=True)
    row.runs_completed += int(run([*args, "resume=true"], work / "train.log") == 0)
    row.add_audit(run_dir)
    return row


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """chattr +i for root (which ignores permission bits), chmod 555 otherwise."""
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


def owner_kills(work: Path, fleet_proc: Any, fleet: Path) -> Row:
    row = Row("owner SIGKILLed (sdp train, launch-servers)")
    run_dir = work / "owner-kill"
    args = [f"run.dir={run_dir}", "train.steps=1000", *SMALL]
    proc = start("train", args, work / "train.log")
    wait_for(
        lambda: any(e.type == "train_step" for e in events(run_dir)) or proc.poll() is not None,
        "a step",
    )
    row.orphans += sigkill_owner(proc, run_dir / "servers.json")
    row.orphans += sigkill_owner(fleet_proc, fleet)
    row.faults += 2
    row.never_trained = "-"
    return row


def print_table(rows: list[Row]) -> None:
    headers = (
        "scenario",
        "faults injected",
        "runs completed",
        "prompts trained twice",
        "prompts never trained",
        "trained samples over the bound",
        "orphan processes",
    )
    lines = [headers] + [
        (
            r.scenario,
            str(r.faults),
            str(r.runs_completed),
            str(r.trained_twice),
            str(r.never_trained),
            str(r.over_bound),
            str(r.orphans),
        )
        for r in rows
    ]
    total = Row("total")
    for r in rows:
        total.faults += r.faults
        total.runs_completed += r.runs_completed
        total.trained_twice += r.trained_twice
        total.over_bound += r.over_bound
        total.orphans += r.orphans
    numbers = [r.never_trained for r in rows if isinstance(r.never_trained, int)]
    lines.append(
        (
            "total",
            str(total.faults),
            str(total.runs_completed),
            str(total.trained_twice),
            str(sum(numbers)),
            str(total.over_bound),
            str(total.orphans),
        )
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for index, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--server-kills", type=int, default=3)
    parser.add_argument("--trainer-kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="sdp-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: work dir {work}", flush=True)
    started = time.monotonic()
    fleet_dir = work / "fleet"
    fleet_proc = start("launch-servers", [f"run.dir={fleet_dir}"], work / "fleet.log")
    fleet = fleet_dir / "servers.json"
    rows = []
    try:
        rows.append(server_kills(work, opts.steps, opts.server_kills, rng))
        wait_for(lambda: any(s["state"] == "ready" for s in registry(fleet)), "the fleet")
        rows.append(trainer_kills(work, opts.steps, opts.trainer_kills, fleet, rng))
        rows.append(write_failures(work, opts.steps, fleet))
        rows.append(owner_kills(work, fleet_proc, fleet))
    finally:
        if fleet_proc.poll() is None:
            fleet_proc.kill()
    print(f"chaos: {time.monotonic() - started:.0f} s; logs in {work}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
