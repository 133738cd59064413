"""The live dashboard, rendered from run logs: the hand-computed small run of small_run.py where
the numbers are checked, and the log a real (simulated) run writes elsewhere."""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from rich.console import Console
from rich.text import Text

from sdp_cli.commands.train import report_server_states
from sdp_cli.events.event_log import EventLog, EventRecorder, read_events
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    Event,
    RunStartedEvent,
    SampleDroppedEvent,
    ServerStateEvent,
    TrainStepEvent,
)
from sdp_cli.inference.pool import ServerPool, ServerState
from sdp_cli.views.dashboard import MAX_REFRESH_PER_SECOND, Dashboard


@pytest.fixture
def recorded(small_run_events: list[Event]) -> Any:
    def make(width: int = 140) -> tuple[Dashboard, Console]:
        console = Console(record=True, width=width, color_system=None)
        dashboard = Dashboard(console=console, live=False)
        dashboard.feed(small_run_events)
        assert list(dashboard.errors) == []
        return dashboard, console

    return make


def rendered_text(dashboard: Dashboard, console: Console) -> str:
    console.print(dashboard.render())
    return console.export_text()


def test_every_panel_is_rendered_with_the_logged_numbers(recorded: Any) -> None:
    text = rendered_text(*recorded())
    for title in ("capacity", "rollouts", "last batch", "training", "weight update", "servers"):
        assert title in text, title
    # Progress: version 3, all 4 planned steps done.
    assert "v3 · step 4/4 · finished" in text
    # Last capacity event of v3: max_concurrent 4, running 0, accepted_live 8, (2+3+1)·2 = 12.
    assert "capacity 4 = min(conc room 4, stale room 4)" in text
    assert "= 4 − 0" in text
    assert "= 12 − (8 + 0)" in text
    for label in ("concurrency bound", "staleness bound", "in flight", "accepted"):
        assert label in text, label
    assert "room 4 of 12" in text
    # Counters counted from the events: 11 submitted, 9 accepted, 1 rejected, 2 dropped, 8 taken.
    assert "submitted  11" in text
    assert "rejected    1" in text
    assert "head_lag 1 · no_recompute 1" in text
    assert "consumed    8" in text
    # Last batch: step 3 at v3, 9 tokens at lag 0 and 9 at lag 1, waited 1.2 s.
    assert "step 3 at v3" in text
    assert "waited 1.2s" in text
    assert "9 tokens" in text
    assert "head lag max 1" in text
    # Weight update to v3: phases of 0.7 s in total.
    assert "→ v3 in 0.70s · 3 updates" in text
    assert "export" in text and "0.30s" in text
    # Server table and throughput.
    assert "127.0.0.1:8001" in text and "ready" in text
    assert "gen tokens/s" in text and "18.0" in text


def test_sparklines_follow_reward_and_loss(recorded: Any) -> None:
    text = rendered_text(*recorded())
    reward_line = next(line for line in text.splitlines() if "reward" in line)
    loss_line = next(line for line in text.splitlines() if "│ loss" in line)
    # Rewards 0.5, 0.75, 0.5, 1.0 and losses 0.4, 0.3, 0.2, 0.1.
    assert "▁▅▁█" in reward_line
    assert "█▆▃▁" in loss_line


def test_narrow_console_stacks_the_panels(simulated_run_log: Path) -> None:
    console = Console(record=True, width=80, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(read_events(simulated_run_log))
    assert list(dashboard.errors) == []
    text = rendered_text(dashboard, console)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "rollouts" in text and "servers" in text


def test_render_before_any_event_does_not_fail() -> None:
    console = Console(record=True, width=120)
    text = rendered_text(Dashboard(console=console, live=False), console)
    assert "no batch taken yet" in text
    assert "no weight update yet" in text


def test_snapshots_override_logged_counters_and_failures_are_shown(recorded: Any) -> None:
    dashboard, console = recorded()
    dashboard.add_snapshot(lambda: {"running": 3, "queue_size": 7})

    def broken() -> dict[str, Any]:
        raise RuntimeError("executor gone")

    dashboard.add_snapshot(broken)
    text = rendered_text(dashboard, console)
    # running 3 from the snapshot: rooms recomputed as 4 − 3 and 12 − (8 + 3).
    assert "capacity 1 = min(conc room 1, stale room 1)" in text
    assert "queue       7" in text
    assert "executor gone" in text


def test_an_executor_shaped_snapshot_is_understood(recorded: Any) -> None:
    dashboard, console = recorded()
    executor_snapshot = {
        "version": 5,
        "max_concurrent": 4,
        "running": 2,
        "accepted_live": 9,
        "staleness_limit": 16,
        "submitted": 30,
        "accepted_total": 12,
        "rejected": 1,
        "dropped_total": 3,
        "dropped": {"head_lag": 2, "no_recompute": 1},
        "consumed": 10,
        "queue_size": 1,
        "paused": False,
        "strategy": "segment_wise",
    }
    dashboard.add_snapshot(lambda: executor_snapshot)
    text = rendered_text(dashboard, console)
    assert "v5 · step 4/4" in text
    assert "capacity 2 = min(conc room 2, stale room 5)" in text
    assert "submitted  30" in text
    assert "accepted   12" in text
    assert "head_lag 2 · no_recompute 1" in text


def test_one_log_line_per_train_step_when_not_a_terminal(small_run_events: list[Event]) -> None:
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=False)
    dashboard = Dashboard(console=console)
    assert dashboard.live is False
    with dashboard:
        dashboard.feed(small_run_events)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    # Step 0 ended 5 s after run_started: 3 steps to go at 5 s each.
    assert lines[0].startswith("[sdp] v0 · step 1/4 · ETA 15.0s")
    last = lines[-1]
    assert "step 4/4" in last
    assert "reward 1" in last and "loss 0.1" in last
    assert "dropped 2 (head_lag=1,no_recompute=1)" in last
    assert "dropped 0" in lines[0]
    assert "ETA 0.0s" in last
    assert "lag head≤1 tail≤0" in last
    assert "18.0 gen tok/s" in last


def test_nothing_is_printed_before_start(simulated_run_log: Path) -> None:
    out = io.StringIO()
    dashboard = Dashboard(console=Console(file=out), live=False)
    dashboard.feed(read_events(simulated_run_log))
    assert out.getvalue() == ""


def test_live_mode_starts_refreshes_and_stops(simulated_run_log: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True)
    dashboard = Dashboard(console=console, refresh_per_second=50)
    assert dashboard.live is True
    assert dashboard.refresh_per_second == MAX_REFRESH_PER_SECOND
    with dashboard:
        dashboard.feed(read_events(simulated_run_log))
    assert "weight update" in out.getvalue()


def test_sink_writes_the_log_then_updates_the_dashboard(tmp_path: Path) -> None:
    console = Console(record=True, width=140)
    dashboard = Dashboard(console=console, live=False)
    log = EventLog(tmp_path / "events.jsonl")
    sink = dashboard.wrap(log)
    sink.emit(
        RunStartedEvent(
            run="t",
            steps=2,
            max_staleness=1,
            batch_size=1,
            strategy="segment_wise",
            prox_mode="segment",
            n_samples=1,
            max_concurrent=2,
            server_count=1,
        )
    )
    sink.emit(TrainStepEvent(step=0, version=0, reward=0.25, loss=1.5))
    sink.close()
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in logged] == ["run_started", "train_step"]
    text = rendered_text(dashboard, console)
    assert "run t" in text and "step 1/2" in text and "0.25" in text


def test_a_display_bug_is_logged_counted_and_shown_not_raised(
    recorded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    dashboard, console = recorded()
    # A writer bug the schema catches when a log is read, not when an event is emitted: a
    # field of the wrong type. Training must go on; the bug must not go unseen.
    broken = BatchTakenEvent(
        ts=1014.0,
        step=4,
        version=3,
        rollout_ids=None,  # type: ignore[arg-type]
        head_lags=[0],
        tail_lags=[0],
        tokens_by_lag={},
        wait_s=0.0,
    )
    with caplog.at_level(logging.ERROR, logger="sdp_cli.views.dashboard"):
        dashboard.emit(broken)
    assert dashboard.error_count == 1
    assert dashboard.errors[0].startswith("batch_taken: TypeError")
    header = " ".join(rendered_text(dashboard, console).split())
    assert "1 display errors (see the log)" in header
    (record,) = caplog.records
    assert record.exc_info is not None


def test_a_render_bug_shows_in_place_of_the_dashboard(recorded: Any) -> None:
    dashboard, _ = recorded()
    dashboard.emit(TrainStepEvent(ts=1014.0, step=4, version=3, reward="high"))  # type: ignore[arg-type]
    assert dashboard.error_count == 0  # stored as it came; it breaks only when drawn
    # What Live shows: the error text, not a frozen screen; and it is counted.
    shown = dashboard._render_for_live()
    assert isinstance(shown, Text)
    assert "dashboard render failed" in shown.plain
    assert dashboard.error_count == 1


@dataclass(frozen=True, kw_only=True)
class _FutureEvent(Event):
    type: ClassVar[str] = "future_event"


def test_an_event_the_dashboard_does_not_show_changes_nothing(recorded: Any) -> None:
    dashboard, console = recorded()
    before = rendered_text(dashboard, console)
    dashboard.emit(_FutureEvent(ts=1013.9))
    assert dashboard.error_count == 0
    assert rendered_text(dashboard, console) == before


def test_a_simulated_runs_log_shows_every_server_and_the_batch_step(
    simulated_run_log: Path,
) -> None:
    console = Console(record=True, width=160, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(read_events(simulated_run_log))
    assert list(dashboard.errors) == []
    text = rendered_text(dashboard, console)
    servers = {
        e.server: e for e in read_events(simulated_run_log) if isinstance(e, ServerStateEvent)
    }
    assert sorted(servers) == [0, 1]
    for index, server in servers.items():
        # One row per server: index, address, state, version, restarts.
        row = f"{index} {server.address} {server.state} {server.version} {server.restarts}"
        assert row in " ".join(text.split()), row
    (last_batch,) = [e for e in read_events(simulated_run_log) if isinstance(e, BatchTakenEvent)][
        -1:
    ]
    assert last_batch.step == 5
    assert f"step 5 at v{last_batch.version}" in text
    assert "v6 · step 6/6 · finished" in text
    assert "no server reported yet" not in text


def test_emitting_from_many_threads_while_rendering(recorded: Any) -> None:
    dashboard, console = recorded()
    stop = threading.Event()

    def render_loop() -> None:
        while not stop.is_set():
            dashboard.render()

    renderer = threading.Thread(target=render_loop)
    renderer.start()

    def drop_many(writer: int) -> None:
        # A rollout is dropped once (the fold counts drops by rollout): each writer its own.
        for i in range(200):
            dashboard.emit(
                SampleDroppedEvent(
                    rollout_id=1000 * (writer + 1) + i,
                    reason="head_lag",
                    point="take",
                    head_lag=3,
                    tail_lag=0,
                    version=3,
                )
            )

    writers = [threading.Thread(target=drop_many, args=(w,)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    renderer.join()
    assert dashboard.error_count == 0
    text = rendered_text(dashboard, console)
    # 4 writers × 200 drops on top of the log's 2.
    assert "802  head_lag 801 · no_recompute 1" in text


def test_attached_servers_are_logged_and_shown_like_a_fleet() -> None:
    # `sdp train server.registry=...` starts no fleet; its servers still reach the panel.
    pool = ServerPool()
    for port in (8001, 8002):
        pool.add(f"http://127.0.0.1:{port}", state=ServerState.ready)
    sink = EventRecorder()
    report_server_states(pool, sink)
    pool.set_version(1, 4)
    states = sink.of(ServerStateEvent)
    assert [(e.server, e.version) for e in states] == [(0, 0), (1, 0), (1, 4)]
    console = Console(record=True, width=140, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(states)
    text = " ".join(rendered_text(dashboard, console).split())
    assert "0 http://127.0.0.1:8001 ready 0 0" in text
    assert "1 http://127.0.0.1:8002 ready 4 0" in text
