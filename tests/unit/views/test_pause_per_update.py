""" "Pause per update" (seconds the servers generate nothing in a weight update), for both
update modes: in `sdp inspect-staleness` (text and --json) and the dashboard (the metrics:
tests/unit/events/test_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import WeightUpdateEvent
from sdp_cli.views.dashboard import Dashboard

runner = CliRunner()


def simulated_log(tmp_path: Path, mode: str) -> Path:
    run_dir = tmp_path / mode
    args = [
        "simulate",
        "--run-dir",
        str(run_dir),
        "train.steps=6",
        f"train.update_mode={mode}",
        "simulate.update_s=0.05",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("mode", ["abort", "keep"])
def test_inspect_staleness_reports_the_pause_per_update(tmp_path: Path, mode: str) -> None:
    run_dir = simulated_log(tmp_path, mode)
    updates = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, WeightUpdateEvent)]
    pauses = [u.generation_pause_s for u in updates]
    assert all(p is not None and p >= 0.05 - 1e-9 for p in pauses)

    result = runner.invoke(app, ["inspect-staleness", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    pause = json.loads(result.output)["pause_per_update"]
    assert pause["mode"] == mode and pause["updates"] == len(updates) == 6
    assert pause["max_s"] == pytest.approx(max(pauses))  # type: ignore[type-var]
    assert pause["mean_s"] == pytest.approx(sum(pauses) / len(pauses))  # type: ignore[arg-type]

    text = runner.invoke(app, ["inspect-staleness", str(run_dir)]).output
    assert f"pause per update ({mode}): mean {pause['mean_s']:.3f} s" in text


def test_the_dashboard_shows_the_pause_per_update(tmp_path: Path) -> None:
    run_dir = simulated_log(tmp_path, "keep")
    console = Console(record=True, width=140, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    dashboard.feed(read_events(run_dir / "events.jsonl"))
    console.print(dashboard.render())
    assert "pause per update (keep): last" in console.export_text()
