"""The pure staleness analysis (events → summary): counting rules and advice."""

from __future__ import annotations

from typing import Any

from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    CapacityEvent,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunStartedEvent,
    SampleDroppedEvent,
    TrainStepEvent,
)
from sdp_cli.views.staleness_analysis import summarize
from sdp_cli.views.widgets import format_duration, format_rate, sparkline


def run_started(**overrides: Any) -> RunStartedEvent:
    fields: dict[str, Any] = {
        "ts": 0.0,
        "run": "t",
        "steps": 4,
        "max_staleness": 1,
        "batch_size": 2,
        "max_concurrent": 8,
        "strategy": "segment_wise",
        "prox_mode": "segment",
        "n_samples": 1,
        "server_count": 1,
    }
    return RunStartedEvent(**{**fields, **overrides})


def finished(
    rollout_id: int, version: int, accepted: bool, reason: str | None = None
) -> RolloutFinishedEvent:
    return RolloutFinishedEvent(
        ts=1.0, rollout_id=rollout_id, version=version, accepted=accepted, reason=reason
    )


def dropped(rollout_id: int, version: int, reason: str, point: str) -> SampleDroppedEvent:
    return SampleDroppedEvent(
        ts=1.0,
        rollout_id=rollout_id,
        version=version,
        reason=reason,
        point=point,
        head_lag=0,
        tail_lag=0,
    )


def batch(version: int, head_lags: list[int], wait_s: float = 0.0) -> BatchTakenEvent:
    return BatchTakenEvent(
        ts=2.0,
        version=version,
        rollout_ids=list(range(len(head_lags))),
        head_lags=head_lags,
        tail_lags=[0] * len(head_lags),
        tokens_by_lag={},
        wait_s=wait_s,
    )


def capacity(conc_room: int, stale_room: int, ts: float = 1.5) -> CapacityEvent:
    return CapacityEvent(
        ts=ts,
        version=0,
        max_concurrent=8,
        running=8 - conc_room,
        accepted_live=0,
        staleness_limit=8,
        concurrency_room=conc_room,
        staleness_room=stale_room,
        capacity=max(0, min(conc_room, stale_room)),
        submitted=0,
        rejected=0,
        dropped_total=0,
        consumed=0,
        queue_size=0,
    )


def train_step(step_s: float, ts: float = 3.0) -> TrainStepEvent:
    return TrainStepEvent(ts=ts, step=0, version=0, step_s=step_s)


def test_a_drop_logged_twice_counts_once_with_the_dedicated_event_winning() -> None:
    summary = summarize(
        [
            finished(1, 3, False, "head_lag"),
            dropped(1, 3, "head_lag", "finish"),
            dropped(2, 3, "no_recompute", "take"),
            finished(2, 3, False, "no_recompute"),  # after its drop event: still one drop
            finished(3, 3, False, "head_lag"),  # no sample_dropped: inferred drop at finish
        ]
    )
    assert summary.dropped_by_reason == {"head_lag": 2, "no_recompute": 1}
    assert summary.dropped_by_point == {"finish": 2, "take": 1}
    assert summary.rejected == 0


def test_a_rejection_later_explained_as_a_drop_is_not_both() -> None:
    summary = summarize([finished(5, 1, False, None), dropped(5, 1, "head_lag", "finish")])
    assert summary.rejected == 0
    assert summary.dropped_total == 1


def test_tight_bound_on_staleness_names_max_staleness() -> None:
    events = [
        run_started(),
        capacity(conc_room=4, stale_room=0),
        capacity(conc_room=3, stale_room=0),
        capacity(conc_room=0, stale_room=2),
        batch(0, [0, 0], wait_s=8.0),
        train_step(step_s=2.0),
    ]
    (advice,) = summarize(events).advice
    assert advice.kind == "tight"
    assert advice.knobs == ("rollout.max_staleness",)
    assert "80%" in advice.message


def test_tight_bound_with_room_to_spare_points_at_generation() -> None:
    events = [run_started(), capacity(4, 4), batch(0, [0], wait_s=5.0)]
    (advice,) = summarize(events).advice
    assert advice.knobs[0] == "server.count"


def test_loose_bound_suggests_lowering_concurrency() -> None:
    events = [
        run_started(),
        *(RolloutSubmittedEvent(ts=0.5, rollout_id=i, version=0) for i in range(10)),
        dropped(1, 1, "head_lag", "purge"),
        dropped(2, 1, "head_lag", "purge"),
        batch(1, [1, 1], wait_s=0.0),
        train_step(step_s=2.0),
    ]
    (advice,) = summarize(events).advice
    assert advice.kind == "loose"
    assert advice.knobs == ("rollout.max_concurrent", "rollout.max_staleness")
    assert "2 of 10" in advice.message


def test_mostly_no_recompute_drops_suggest_a_prox_mode() -> None:
    events = [run_started(), dropped(1, 2, "no_recompute", "take")]
    (advice,) = summarize(events).advice
    assert "train.prox_mode" in advice.knobs


def test_standard_strategy_lag_beyond_eta_is_reported() -> None:
    events = [run_started(strategy="standard"), batch(3, [0, 2, 3])]
    summary = summarize(events)
    assert summary.max_trained_lag == 3
    (advice,) = summary.advice
    assert advice.kind == "bound_exceeded"
    assert advice.knobs == ("rollout.strategy",)
    assert "2 trained samples" in advice.message


def test_a_quiet_run_gets_no_warning() -> None:
    events = [run_started(), batch(0, [0, 0], wait_s=0.1), train_step(step_s=1.0)]
    assert summarize(events).advice == []


def test_wall_time_falls_back_to_the_event_span() -> None:
    summary = summarize([run_started(ts=10.0), capacity(4, 4, ts=12.5)])
    assert summary.time.wall_s == 2.5
    assert not summary.finished


def test_widgets() -> None:
    assert sparkline([1, 2, 3]) == "▁▅█"
    assert sparkline([2, 2]) == "▅▅"
    assert sparkline([]) == ""
    assert format_duration(75) == "1m15s"
    assert format_duration(7300) == "2h01m"
    assert format_duration(None) == "—"
    # A tiny model's optimizer step: milliseconds, not "0.0s".
    assert format_duration(0.031) == "31ms"
    assert format_duration(2.25) == "2.2s"
    assert format_rate(2400.0) == "2.4k"
    assert format_rate(12.345) == "12.3"
