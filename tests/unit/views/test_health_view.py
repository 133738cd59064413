"""Off-policy health from the log to where it shows: the event round-trip, the fold into
inspect-staleness's JSON and text, the dashboard panel, the TensorBoard scalars and the
warnings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import event_line
from sdp_cli.events.event_schema import TrainStepEvent, parse_event
from sdp_cli.events.metrics import health_scalars
from sdp_cli.views.dashboard import Dashboard
from sdp_cli.views.staleness_analysis import summarize
from tests.unit.views.test_staleness_analysis import run_started


def _record(tokens: float, kl: float, clip: float, cap: float, p99: float) -> dict[str, float]:
    return {
        "tokens": tokens,
        "mismatch_kl": kl,
        "clip_fraction": clip,
        "clip_low_fraction": clip / 2,
        "clip_high_fraction": clip / 2,
        "cap_fraction": cap,
        "floor_fraction": 0.0,
        "behav_weight_p99": p99,
        "behav_weight_max": p99 * 2,
        "adv_mean": 0.0,
        "adv_std": 1.0,
        "adv_min": -1.0,
        "adv_max": 1.0,
        "adv_zero_fraction": 0.25,
    }


def _step(step: int, lag1_kl: float, lag1_cap: float, clip: float = 0.1) -> TrainStepEvent:
    lag0 = _record(100, 0.001, clip, 0.0, 1.1)
    lag1 = _record(300, lag1_kl, clip, lag1_cap, 1.5 + step)
    total = {
        **_record(400, (0.1 + 300 * lag1_kl) / 400, clip, 300 * lag1_cap / 400, 1.5 + step),
        "uninformative_group_fraction": 0.5 * step,
    }
    return TrainStepEvent(
        step=step, version=step, health=total, health_by_lag={"0": lag0, "1": lag1}
    )


def _events(lag1_kl: float = 0.01, lag1_cap: float = 0.0, clip: float = 0.1) -> list:
    start = run_started(max_staleness=2)
    return [start, _step(0, lag1_kl, lag1_cap, clip), _step(1, lag1_kl, lag1_cap, clip)]


def test_health_fields_round_trip_under_strict_parsing() -> None:
    event = dataclasses.replace(_step(0, 0.02, 0.1), ts=5.0)
    assert parse_event(json.loads(event_line(event)), strict=True) == event


def test_the_fold_gives_run_and_by_lag_health_in_the_json() -> None:
    data = summarize(_events(lag1_kl=0.02)).to_dict()
    by_lag = data["health_by_lag"]
    assert list(by_lag) == ["0", "1"]
    assert by_lag["1"]["mismatch_kl"] == pytest.approx(0.02)
    assert by_lag["1"]["clip_fraction"] == pytest.approx(0.1)
    assert by_lag["1"]["tokens"] == 600
    # Run level: token-weighted means, the worst p99 and max, the mean uninformative share.
    run = data["health"]
    assert run["mismatch_kl"] == pytest.approx((0.1 + 300 * 0.02) / 400)
    assert run["behav_weight_p99"] == pytest.approx(2.5)
    assert run["behav_weight_max"] == pytest.approx(5.0)
    assert run["uninformative_group_fraction"] == pytest.approx(0.25)
    assert run["steps"] == 2
    assert data["warnings"] == []


def test_inspect_staleness_shows_the_table_and_the_json_keys(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("".join(event_line(e) + "\n" for e in _events()))
    runner = CliRunner()
    result = runner.invoke(app, ["inspect-staleness", str(run), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"mismatch_kl", "clip_fraction", "cap_fraction"} <= set(data["health_by_lag"]["0"])
    assert "mismatch_kl" in data["health"]
    result = runner.invoke(app, ["inspect-staleness", str(run)])
    assert result.exit_code == 0, result.output
    assert "off-policy health by lag" in result.output
    assert "uninformative groups" in result.output


def test_the_dashboard_panel_renders() -> None:
    console = Console(record=True, width=160, color_system=None)
    dashboard = Dashboard(console=console, live=False)
    console.print(dashboard.render())
    assert "no train step yet" in console.export_text()
    dashboard.feed(_events(lag1_kl=0.02))
    assert list(dashboard.errors) == []
    console.print(dashboard.render())
    text = console.export_text()
    assert "off-policy health" in text
    assert "w p99" in text
    assert "0.02" in text


def test_tensorboard_scalars_name_the_step_and_each_lag() -> None:
    scalars = health_scalars(_step(0, 0.02, 0.1))
    assert scalars["health/mismatch_kl"] == pytest.approx((0.1 + 6.0) / 400)
    assert scalars["health/lag1/mismatch_kl"] == pytest.approx(0.02)
    assert scalars["health/lag0/clip_fraction"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("events", "knob"),
    [
        (_events(lag1_cap=0.4), "train.behav_weight_cap"),
        (_events(lag1_kl=0.2), "rollout.max_staleness"),
        (_events(clip=0.4), "train.lr"),
    ],
)
def test_a_value_outside_the_healthy_range_warns_naming_the_key(events: list, knob: str) -> None:
    warnings = summarize(events).to_dict()["warnings"]
    health = [w for w in warnings if w["kind"] == "health"]
    assert len(health) == 1
    assert knob in health[0]["knobs"]
    assert knob in health[0]["message"]
