"""The live dashboard, rendered from the recorded small run (tests/data/staleness_small.jsonl)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from sdp_cli.telemetry.dashboard import MAX_REFRESH_PER_SECOND, Dashboard
from sdp_cli.telemetry.events import EventLog, read_events

SMALL_LOG = Path(__file__).parent / "data" / "staleness_small.jsonl"


def recorded(width: int = 140) -> tuple[Dashboard, Console]:
    console = Console(record=True, width=width, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(read_events(SMALL_LOG))
    return dashboard, console


def rendered_text(dashboard: Dashboard, console: Console) -> str:
    console.print(dashboard.render())
    return console.export_text()


def test_every_panel_is_rendered_with_the_logged_numbers() -> None:
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


def test_sparklines_follow_reward_and_loss() -> None:
    text = rendered_text(*recorded())
    reward_line = next(line for line in text.splitlines() if "reward" in line)
    loss_line = next(line for line in text.splitlines() if "│ loss" in line)
    # Rewards 0.5, 0.75, 0.5, 1.0 and losses 0.4, 0.3, 0.2, 0.1.
    assert "▁▅▁█" in reward_line
    assert "█▆▃▁" in loss_line


def test_narrow_console_stacks_the_panels() -> None:
    text = rendered_text(*recorded(width=80))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "rollouts" in text and "servers" in text


def test_render_before_any_event_does_not_fail() -> None:
    console = Console(record=True, width=120)
    text = rendered_text(Dashboard(console=console, live=False), console)
    assert "no batch taken yet" in text
    assert "no weight update yet" in text


def test_snapshots_override_logged_counters_and_failures_are_shown() -> None:
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


def test_an_executor_shaped_snapshot_is_understood() -> None:
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


def test_one_log_line_per_train_step_when_not_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=False)
    dashboard = Dashboard(console=console)
    assert dashboard.live is False
    with dashboard:
        dashboard.feed(read_events(SMALL_LOG))
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


def test_nothing_is_printed_before_start() -> None:
    out = io.StringIO()
    dashboard = Dashboard(console=Console(file=out), live=False)
    dashboard.feed(read_events(SMALL_LOG))
    assert out.getvalue() == ""


def test_live_mode_starts_refreshes_and_stops() -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True)
    dashboard = Dashboard(console=console, refresh_per_second=50)
    assert dashboard.live is True
    assert dashboard.refresh_per_second == MAX_REFRESH_PER_SECOND
    with dashboard:
        dashboard.feed(read_events(SMALL_LOG))
    assert "weight update" in out.getvalue()


def test_sink_writes_the_log_then_updates_the_dashboard(tmp_path: Path) -> None:
    console = Console(record=True, width=140)
    dashboard = Dashboard(console=console, live=False)
    log = EventLog(tmp_path / "events.jsonl")
    sink = dashboard.wrap(log)
    sink.emit("run_started", run="t", steps=2, max_staleness=1, batch_size=1)
    sink.emit("train_step", step=0, version=0, reward=0.25, loss=1.5)
    sink.close()
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in logged] == ["run_started", "train_step"]
    text = rendered_text(dashboard, console)
    assert "run t" in text and "step 1/2" in text and "0.25" in text


def test_bad_fields_never_reach_the_caller() -> None:
    dashboard, console = recorded()
    dashboard.emit("batch_taken", head_lags="many", tokens_by_lag=[1, 2], wait_s="slow")
    dashboard.emit("server_state", index="first")
    dashboard.emit("weight_update", phases=None, total_s=None)
    dashboard.emit("something_new", payload=object())
    text = rendered_text(dashboard, console)
    assert "Traceback" not in text


def test_emitting_from_many_threads_while_rendering() -> None:
    dashboard, console = recorded()
    stop = threading.Event()

    def render_loop() -> None:
        while not stop.is_set():
            dashboard.render()

    renderer = threading.Thread(target=render_loop)
    renderer.start()

    def drop_many() -> None:
        for i in range(200):
            dashboard.emit("sample_dropped", reason="head_lag", rollout_id=i)

    writers = [threading.Thread(target=drop_many) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    renderer.join()
    assert dashboard.ignored_errors == 0
    text = rendered_text(dashboard, console)
    # 4 writers × 200 drops on top of the log's 2.
    assert "802  head_lag 801 · no_recompute 1" in text
