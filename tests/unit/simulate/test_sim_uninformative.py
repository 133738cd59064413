"""`simulate.uninformative_fraction` with dynamic sampling: the real executor filters the
all-equal groups, the counts add up, and the run log shows them as drop reason
`uninformative` in the fold `sdp inspect-staleness` and the dashboard read."""

from __future__ import annotations

import pytest

from sdp_cli.config import load_config
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.events.event_schema import SampleDroppedEvent, UninformativeWarningEvent
from sdp_cli.rollout.executor import ExecutorError
from sdp_cli.simulate import run_simulation
from sdp_cli.views.event_fold import DROP_REASONS, RunFold


def _run(*overrides: str, events: EventRecorder | None = None) -> dict:
    cfg = load_config(None, ["rollout.filter_groups=same_reward", "train.steps=6", *overrides])
    return run_simulation(cfg, events=events, timeout_s=120)


def test_a_high_share_of_uninformative_groups_finishes_and_adds_up() -> None:
    events = EventRecorder()
    result = _run(
        "simulate.uninformative_fraction=0.9",
        "rollout.max_uninformative_fraction=1.0",
        events=events,
    )
    assert result["steps"] == 6
    assert result["consumed"] == 6 * result["batch_size"]
    filtered = result["dropped"]["uninformative"]
    assert filtered > result["consumed"]  # ~9 filtered per trained group
    assert result["rollouts_submitted"] == (
        result["running_at_end"]
        + result["accepted_live"]
        + result["rejected"]
        + result["dropped_total"]
    )
    assert "uninformative" in DROP_REASONS
    fold = RunFold()
    fold.add_all(events.events)
    reasons = [drop.reason for drop in fold.drop_by_rollout.values()]
    logged = [e for e in events.of(SampleDroppedEvent) if e.reason == "uninformative"]
    assert reasons.count("uninformative") == len(logged)
    # The result is read when the trainer ends; groups that finish while the executor stops
    # are still logged.
    assert len(logged) >= filtered


def test_without_the_filter_nothing_is_uninformative() -> None:
    result = _run("simulate.uninformative_fraction=0.0")
    assert "uninformative" not in result["dropped"]


def test_only_uninformative_groups_warn_then_stop_the_run() -> None:
    events = EventRecorder()
    with pytest.raises(ExecutorError, match=r"rollout\.filter_groups=none"):
        _run(
            "simulate.uninformative_fraction=1.0",
            "rollout.uninformative_window=16",
            events=events,
        )
    assert len(events.of(UninformativeWarningEvent)) == 1
