"""What a run's views show of crashed servers and poison requests: `sdp inspect-staleness`
(text and --json) and the dashboard, from the events the supervisor and the executor write."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import (
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    ServerStateEvent,
)
from sdp_cli.views.dashboard import Dashboard

ADDRESS = "http://127.0.0.1:8001"
DIED = (
    "process exited with code 1; last error in logs/server-0.log: "
    "RuntimeError: CPU Generator does not use offset"
)
POISON = "PoisonRequestError: /inference/v1/generate: refused as a poison request"


def troubled_run() -> list[Event]:
    """Four rollouts: one accepted, one rejected as poison after server 0 died twice serving
    it, one failed, one cancelled; server 1 given up for good."""
    events: list[Event] = [RolloutSubmittedEvent(rollout_id=i, version=0) for i in range(4)]
    events += [
        ServerStateEvent(server=0, address=ADDRESS, state="ready", version=0),
        ServerStateEvent(server=1, address=ADDRESS, state="ready", version=0),
        ServerStateEvent(server=0, address=ADDRESS, state="restarting", restarts=0, reason=DIED),
        ServerStateEvent(server=0, address=ADDRESS, state="ready", version=0, restarts=1),
        ServerStateEvent(server=0, address=ADDRESS, state="restarting", restarts=1, reason=DIED),
        ServerStateEvent(server=0, address=ADDRESS, state="ready", version=0, restarts=2),
        RolloutFinishedEvent(rollout_id=0, version=0, accepted=True, n_tokens=4, n_segments=1),
        RolloutFinishedEvent(
            rollout_id=1, version=0, accepted=False, reason="poison", error=POISON
        ),
        RolloutFinishedEvent(rollout_id=2, version=0, accepted=False, reason="error", error="x"),
        RolloutFinishedEvent(rollout_id=3, version=0, accepted=False, reason="cancelled"),
        ServerStateEvent(
            server=1,
            address=ADDRESS,
            state="dead",
            restarts=3,
            reason=f"{DIED}; given up after 3 restarts (server.max_restarts)",
        ),
    ]
    return events


def write_log(run_dir: Path, events: list[Event]) -> None:
    log = EventLog(run_dir / "events.jsonl")
    for event in events:
        log.emit(event)
    log.close()


def test_inspect_staleness_counts_poison_requests_and_names_what_each_server_died_of(
    tmp_path: Path,
) -> None:
    write_log(tmp_path, troubled_run())
    runner = CliRunner()

    report = json.loads(runner.invoke(app, ["inspect-staleness", str(tmp_path), "--json"]).output)
    assert report["rejected"] == 3
    assert report["rejected_by_reason"] == {"poison": 1, "error": 1, "cancelled": 1}
    assert report["poison_requests"] == 1 and report["poison_errors"] == [POISON]
    assert [(i["server"], i["state"], i["restarts"]) for i in report["server_incidents"]] == [
        (0, "restarting", 0),
        (0, "restarting", 1),
        (1, "dead", 3),
    ]
    assert all(
        "CPU Generator does not use offset" in i["reason"] for i in report["server_incidents"]
    )

    text = " ".join(runner.invoke(app, ["inspect-staleness", str(tmp_path)]).output.split())
    assert "rejected rollouts: 1 poison, 1 error, 1 cancelled" in text
    assert "1 poison request(s): servers died twice while serving them" in text
    assert "server 1 dead (restarts 3): process exited with code 1" in text
    assert "given up after 3 restarts" in text


def test_the_dashboard_shows_rejections_by_reason_and_a_restarted_servers_last_crash() -> None:
    console = Console(record=True, width=220, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(troubled_run())
    assert list(dashboard.errors) == []
    console.print(dashboard.render())
    shown = " ".join(console.export_text().split())
    assert "rejected 3 poison 1 · error 1 · cancelled 1" in shown
    # Server 0 is ready again, and still shows what it last died of.
    assert f"0 {ADDRESS} ready 0 2 process exited with code 1; last error" in shown
