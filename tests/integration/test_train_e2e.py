"""`sdp train` end to end on real vLLM CPU servers with the built-in model and task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from omegaconf import OmegaConf
from rich.console import Console
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    EvalEvent,
    Event,
    ProximalRecomputeEvent,
    RolloutFinishedEvent,
    RunStartedEvent,
    ServerStateEvent,
    TrainStepEvent,
    WeightUpdateEvent,
    parse_event,
)
from sdp_cli.launcher.devices import split_cpu_cores
from sdp_cli.orchestrator.sample_log import read_samples
from sdp_cli.views.dashboard import Dashboard

pytestmark = pytest.mark.vllm
runner = CliRunner()

SMALL = [
    "rollout.batch_size=4",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "rollout.max_concurrent=16",
]


E = TypeVar("E", bound=Event)


def events_of(run_dir: Path, kind: type[E]) -> list[E]:
    return [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, kind)]


def schema_checked_log(run_dir: Path) -> list[Event]:
    """Every line of the run log, parsed strictly: a known type, every field declared by the
    schema and of its type."""
    events = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = parse_event(json.loads(line), strict=True)
        assert event is not None, f"unknown event type: {line}"
        events.append(event)
    return events


def rendered_dashboard(events: list[Event]) -> str:
    console = Console(record=True, width=160, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(events)
    assert list(dashboard.errors) == []
    console.print(dashboard.render())
    return " ".join(console.export_text().split())


def train(run_dir: Path, *overrides: str) -> None:
    result = runner.invoke(app, ["train", f"run.dir={run_dir}", *SMALL, *overrides])
    assert result.exit_code == 0, result.output


def test_segment_wise_run_keeps_every_trained_token_within_the_bound(tmp_path: Path) -> None:
    run_dir = tmp_path / "eta1"
    train(
        run_dir,
        "train.steps=5",
        "rollout.max_staleness=1",
        "eval.every=5",
        "eval.n_prompts=4",
        "log.backends=[tensorboard]",
    )
    assert "max_staleness: 1" in (run_dir / "config.yaml").read_text()
    placed = OmegaConf.load(run_dir / "config.yaml")
    split = split_cpu_cores(sorted(os.sched_getaffinity(0)))
    servers, trainer = split if split is not None else ([], [])
    assert (list(placed.server.cpu_cores), list(placed.train.cpu_cores)) == (servers, trainer)
    if servers:  # vLLM bound its threads to the servers' cores, as told
        bind = ",".join(map(str, servers))
        assert (
            f"VLLM_CPU_OMP_THREADS_BIND='{bind}'" in (run_dir / "logs" / "server-0.log").read_text()
        )
    events = schema_checked_log(run_dir)
    steps = events_of(run_dir, TrainStepEvent)
    assert [s.step for s in steps] == [0, 1, 2, 3, 4]
    batches = events_of(run_dir, BatchTakenEvent)
    # Each batch names the trainer step it was taken for.
    assert [b.step for b in batches] == [0, 1, 2, 3, 4]
    for batch in batches:
        assert len(batch.head_lags) == 4
        # Lag = trained version − token version: never negative (no token newer than the
        # version trained) and never beyond η.
        assert all(0 <= lag <= 1 for lag in batch.head_lags + batch.tail_lags)
        assert all(0 <= int(lag) <= 1 for lag in batch.tokens_by_lag)
    updates = events_of(run_dir, WeightUpdateEvent)
    assert [u.version for u in updates] == [1, 2, 3, 4, 5]
    assert {"pause_s", "recompute_s", "export_s", "reload_s", "resume_s"} <= set(updates[0].phases)
    # train.overlap_reload: each update with a step after it tried to take that step's batch
    # before the reload; one that did left the trainer less than the whole update to wait.
    assert ["take_next_s" in u.phases for u in updates] == [True] * 4 + [False]
    for update in updates:
        assert update.trainer_wait_s is not None and update.trainer_wait_s <= update.total_s
    # The dashboard of this run: every server (address, state, version, restarts), the step.
    shown = rendered_dashboard(events)
    servers = {e.server: e for e in events if isinstance(e, ServerStateEvent)}
    assert servers
    for index, server in servers.items():
        assert (
            f"{index} {server.address} {server.state} {server.version} {server.restarts}" in shown
        )
    assert "step 4 at v4" in shown
    assert (run_dir / "weights" / "v5" / "model.safetensors").is_file()
    # Held-out evaluation before the first step and after the last, on the servers' version.
    evals = events_of(run_dir, EvalEvent)
    assert [(e.step, e.version, e.n_prompts) for e in evals] == [(0, 0, 4), (5, 5, 4)]
    assert all(0.0 <= e.accuracy <= e.pass_at_k <= 1.0 for e in evals)
    trained = [r for r in read_samples(run_dir / "samples.jsonl") if r["kind"] == "trained"]
    assert [r["step"] for r in trained] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(r["head_lag"] <= 1 and r["version_spans"] for r in trained)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    inspected = runner.invoke(app, ["inspect-staleness", str(run_dir), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.output)
    assert report["steps"] == 5
    assert report["max_trained_lag"] <= 1
    # Each completion's time and tokens, for `sdp simulate --calibrate`.
    finished = [e for e in events_of(run_dir, RolloutFinishedEvent) if e.n_tokens > 0]
    assert finished
    for event in finished:
        assert event.completion_s is not None and event.completion_tokens is not None
        assert len(event.completion_s) == 2 and all(t > 0 for t in event.completion_s)
        assert sum(event.completion_tokens) == event.n_tokens
        assert event.prompt_tokens is not None and len(event.prompt_tokens) == 2
        assert all(n > 0 for n in event.prompt_tokens)


def test_long_completions_cut_by_updates_continue_without_a_server_restart(
    tmp_path: Path,
) -> None:
    """Completions of up to 200 tokens with 32 in flight: each update aborts many mid-way, and
    their re-prefills together exceed one engine step's budget, which made CPU servers crash
    (launcher/command.py cpu_scheduler_args) before they stopped splitting prefills."""
    run_dir = tmp_path / "long"
    train(
        run_dir,
        "train.steps=4",
        "rollout.max_new_tokens=200",
        "rollout.max_concurrent=32",
        "rollout.batch_size=8",
        "rollout.n_samples=4",
        "eval.every=4",
        "eval.n_prompts=4",
    )
    steps = events_of(run_dir, TrainStepEvent)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    # Long samples are scored under the new weights at each update, and evaluated.
    recomputes = events_of(run_dir, ProximalRecomputeEvent)
    assert sum(r.tokens for r in recomputes) > 0 and not any(r.failures for r in recomputes)
    assert [(e.step, e.n_prompts) for e in events_of(run_dir, EvalEvent)] == [(0, 4), (4, 4)]
    states = events_of(run_dir, ServerStateEvent)
    assert states and not [e for e in states if e.state == "restarting" or e.restarts]
    finished = events_of(run_dir, RolloutFinishedEvent)
    assert any(e.n_segments >= 2 and e.n_tokens >= 64 for e in finished)
    assert "CPU Generator" not in (run_dir / "logs" / "server-0.log").read_text()


def test_the_trainer_can_score_the_proximal_recompute(tmp_path: Path) -> None:
    run_dir = tmp_path / "trainer-recompute"
    train(run_dir, "train.steps=5", "rollout.max_staleness=2", "rollout.recompute_on=trainer")
    steps = events_of(run_dir, TrainStepEvent)
    assert [s.step for s in steps] == [0, 1, 2, 3, 4]
    by_trainer = sum(int(s.stats.get("trainer_recompute_samples", 0)) for s in steps)
    recomputes = events_of(run_dir, ProximalRecomputeEvent)
    # What the trainer scored is written at the updates as scores taken early (none by the
    # servers: their early scoring is off), the rest scored by the servers then.
    assert by_trainer > 0
    assert sum(r.early_samples for r in recomputes) <= by_trainer
    assert sum(r.early_samples for r in recomputes) > 0
    assert all(r.failures == 0 and r.settled for r in recomputes)
    # The trainer scores at the servers' version, so no update hands over a batch before its
    # reload (train.overlap_reload does not apply).
    for update in events_of(run_dir, WeightUpdateEvent):
        assert "take_next_s" not in update.phases and update.trainer_wait_s == update.total_s


def test_eta_zero_trains_only_tokens_of_the_version_being_trained(tmp_path: Path) -> None:
    run_dir = tmp_path / "eta0"
    # The weights go through a memory-backed directory, which the run deletes at its end.
    train(
        run_dir,
        "train.steps=3",
        "rollout.max_staleness=0",
        "rollout.strategy=standard",
        "train.weights_dir=memory",
    )
    schema_checked_log(run_dir)
    for batch in events_of(run_dir, BatchTakenEvent):
        assert set(batch.tokens_by_lag) == {"0"}
        assert batch.head_lags == [0, 0, 0, 0]
    updates = events_of(run_dir, WeightUpdateEvent)
    assert [u.version for u in updates] == [1, 2, 3]
    exported = {Path(u.weights_dir or "").parent for u in updates}
    assert len(exported) == 1 and exported.pop().parent == Path("/dev/shm")
    assert not any(Path(u.weights_dir or "").exists() for u in updates)
    assert not (run_dir / "weights").exists()


def descendants_alive(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def running_pids(processes: list[psutil.Process]) -> list[int]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def still_running_after(processes: list[psutil.Process], timeout_s: float) -> list[int]:
    """Wait until every process is gone, at most `timeout_s`; the pids still running then.
    (Waiting for the event rather than sleeping a fixed time: a slow exit is not a leak, and a
    leaked process is still there at the deadline.)"""
    deadline = time.monotonic() + timeout_s
    while running_pids(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running_pids(processes)


def test_ctrl_c_leaves_no_process_and_resume_finishes_without_double_counting(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "resumable"
    args = [f"run.dir={run_dir}", *SMALL, "train.steps=6", "train.checkpoint_every=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdp_cli", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        while not (run_dir / "checkpoints" / "step-2").is_dir():
            assert proc.poll() is None, "sdp train exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            children = descendants_alive(proc.pid) or children
            time.sleep(0.2)
        children = descendants_alive(proc.pid) or children
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert children, "sdp train should have started server processes"
    assert still_running_after(children, 10.0) == []

    before = events_of(run_dir, TrainStepEvent)
    train(run_dir, "train.steps=6", "train.checkpoint_every=2", "resume=true")
    steps = events_of(run_dir, TrainStepEvent)
    after = steps[len(before) :]
    resumed_from = next(s for s in events_of(run_dir, RunStartedEvent) if s.resumed_from_step)
    checkpoint_step = resumed_from.resumed_from_step
    assert checkpoint_step >= 2 and checkpoint_step % 2 == 0
    # The resumed run trains exactly the remaining steps, at the versions that follow.
    assert [s.step for s in after] == list(range(checkpoint_step, 6))
    assert [s.version for s in after] == list(range(checkpoint_step, 6))
    # Samples are identified by their data position: none is trained twice across the two
    # sessions (counting only the first session's steps that the checkpoint kept).
    kept = [s for s in before if s.step < checkpoint_step]
    positions = [p for s in kept + after for p in s.positions]
    assert len(positions) == 6 * 4
    assert len(set(positions)) == len(positions)
