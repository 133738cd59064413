"""Strategies and the synchronous core: lags, the three check points, drop events."""

from __future__ import annotations

import pytest

from sdp_cli.config.train_settings import ProxMode
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.events.event_schema import BatchTakenEvent, RolloutFinishedEvent, SampleDroppedEvent
from sdp_cli.rollout.control import StalenessControl
from sdp_cli.rollout.staleness import StalenessManager, conservation_holds
from sdp_cli.rollout.strategy import (
    Buffered,
    DropReason,
    SegmentWiseStrategy,
    StandardStrategy,
    make_strategy,
)
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory


def group(*token_versions: list[int], recompute_version: int = -1, rid: int = 0) -> RolloutGroup:
    samples = [
        Trajectory(
            prompt_ids=[1],
            output_ids=[5] * len(versions),
            behav_logprobs=[-1.0] * len(versions),
            versions=list(versions),
            recompute_version=recompute_version,
        )
        for versions in token_versions
    ]
    return RolloutGroup(rollout_id=rid, samples=samples)


def item(*token_versions: list[int], recompute_version: int = -1) -> Buffered:
    return Buffered.of(group(*token_versions, recompute_version=recompute_version))


def control(
    eta: int = 1,
    batch: int = 2,
    concurrent: int = 100,
    strategy: str = "segment_wise",
    prox_mode: ProxMode = ProxMode.segment,
) -> tuple[StalenessControl, EventRecorder]:
    sink = EventRecorder()
    manager = StalenessManager(max_staleness=eta, batch_size=batch, max_concurrent=concurrent)
    return StalenessControl(manager, make_strategy(strategy, eta, prox_mode), sink), sink


# ---- strategies ---------------------------------------------------------------------------


def test_lags_are_taken_over_all_tokens_of_the_group() -> None:
    entry = item([3, 3, 4], [5, 5])
    assert (entry.head, entry.tail) == (3, 5)
    assert entry.head_lag(6) == 3
    assert entry.tail_lag(6) == 1


def test_segment_wise_drops_head_lag_beyond_eta() -> None:
    strategy = SegmentWiseStrategy(max_staleness=2, prox_mode=ProxMode.loglinear)
    assert strategy.drop_reason(item([3, 4]), version=5) is None
    assert strategy.drop_reason(item([2, 5]), version=5) == DropReason.head_lag


def test_segment_mode_drops_unrecomputed_samples_with_tail_lag_over_one() -> None:
    strategy = SegmentWiseStrategy(max_staleness=4, prox_mode=ProxMode.segment)
    assert strategy.drop_reason(item([3, 3]), version=5) == DropReason.no_recompute
    assert strategy.drop_reason(item([3, 3], recompute_version=4), version=5) is None
    # Tail lag 1: the newest segment's weights are still close enough.
    assert strategy.drop_reason(item([3, 4]), version=5) is None
    # Other prox modes have their own correction and do not need the recompute.
    loglinear = SegmentWiseStrategy(max_staleness=4, prox_mode=ProxMode.loglinear)
    assert loglinear.drop_reason(item([3, 3]), version=5) is None


def test_eta_zero_keeps_only_tokens_of_the_current_version() -> None:
    strategy = SegmentWiseStrategy(max_staleness=0, prox_mode=ProxMode.segment)
    assert strategy.drop_reason(item([4, 4]), version=4) is None
    assert strategy.drop_reason(item([3, 4]), version=4) == DropReason.head_lag


def test_standard_never_drops() -> None:
    strategy = StandardStrategy()
    stale = [item([0]), item([0, 9])]
    assert strategy.drop_reason(stale[0], version=100) is None
    kept, dropped = strategy.partition(stale, version=100)
    assert kept == stale
    assert dropped == []


def test_partition_agrees_with_drop_reason_and_keeps_order() -> None:
    strategy = SegmentWiseStrategy(max_staleness=2, prox_mode=ProxMode.segment)
    entries = [
        item([5]),
        item([2, 5]),
        item([3], recompute_version=4),
        item([3]),
        item([]),
        item([4, 5]),
    ]
    kept, dropped = strategy.partition(entries, version=5)
    assert kept == [e for e in entries if strategy.drop_reason(e, 5) is None]
    assert [(e, r) for e, r in dropped] == [
        (e, strategy.drop_reason(e, 5)) for e in entries if strategy.drop_reason(e, 5)
    ]
    assert [r for _, r in dropped] == [DropReason.head_lag, DropReason.no_recompute]


# ---- the three check points ---------------------------------------------------------------


def test_drop_at_finish_never_enters_the_buffer_and_emits_one_event() -> None:
    core, sink = control(eta=0, batch=2)
    rid = core.admit()
    assert rid is not None
    core.set_version(1)
    assert core.finish(rid, group([0, 1])) is False
    assert core.buffer_size == 0
    snap = core.snapshot()
    assert snap["accepted_live"] == 0
    assert snap["dropped"] == {"head_lag": 1}
    assert snap["rejected"] == 0
    assert conservation_holds(snap)
    (event,) = sink.of(SampleDroppedEvent)
    assert event == SampleDroppedEvent(
        rollout_id=rid,
        reason="head_lag",
        point="finish",
        head_lag=1,
        tail_lag=0,
        version=1,
        head_version=0,
        tail_version=1,
    )
    (finished,) = sink.of(RolloutFinishedEvent)
    assert finished.accepted is False
    assert finished.reason == "head_lag"


def test_version_change_purges_the_whole_buffer_and_survivors_keep_order() -> None:
    core, sink = control(eta=1, batch=10, prox_mode=ProxMode.loglinear)
    ids = [core.admit() for _ in range(5)]
    assert core.version == 0
    for rid in ids:
        assert rid is not None
    core.finish(ids[0], group([0]))
    core.set_version(1)
    core.finish(ids[1], group([1]))
    core.finish(ids[2], group([0, 1]))
    core.finish(ids[3], group([1]))
    core.finish(ids[4], group([1]))
    dropped = core.set_version(2)
    assert dropped == 2
    assert [e.rollout_id for e in core.buffered()] == [ids[1], ids[3], ids[4]]
    events = sink.of(SampleDroppedEvent)
    assert [(e.rollout_id, e.point, e.head_lag) for e in events] == [
        (ids[0], "purge", 2),
        (ids[2], "purge", 2),
    ]
    assert conservation_holds(core.snapshot())


def test_take_returns_oldest_valid_groups_and_filters_stale_ones() -> None:
    core, sink = control(eta=1, batch=2, concurrent=100, prox_mode=ProxMode.loglinear)
    ids = [core.admit() for _ in range(4)]
    for rid in ids:
        assert rid is not None
        core.finish(rid, group([0]))
    # Make the buffered groups stale without a purge, as if the version moved under us.
    core.manager.set_version(2)
    assert core.take(2) is None
    assert core.buffer_size == 0
    events = sink.of(SampleDroppedEvent)
    assert {e.point for e in events} == {"take"}
    assert core.snapshot()["dropped"] == {"head_lag": 4}
    assert conservation_holds(core.snapshot())


def test_take_waits_for_a_full_batch_without_losing_order() -> None:
    core, sink = control(eta=2, batch=3)
    ids = [core.admit() for _ in range(3)]
    core.finish(ids[0], group([0]))  # type: ignore[arg-type]
    core.finish(ids[1], group([0]))  # type: ignore[arg-type]
    assert core.take(3) is None
    core.finish(ids[2], group([0]))  # type: ignore[arg-type]
    batch = core.take(3, wait_s=1.5, step=7)
    assert batch is not None
    assert [g.rollout_id for g in batch] == ids
    assert core.snapshot()["consumed"] == 3
    (taken,) = sink.of(BatchTakenEvent)
    assert taken == BatchTakenEvent(
        step=7,
        version=0,
        rollout_ids=ids,  # type: ignore[arg-type]
        head_lags=[0, 0, 0],
        tail_lags=[0, 0, 0],
        tokens_by_lag={"0": 3},
        wait_s=1.5,
    )


def test_take_ahead_gives_the_batch_a_take_after_the_version_change_would() -> None:
    """During an update to v = 2 (train.overlap_reload): the oldest groups valid at 2 are
    taken at once; a stale one stays for the purge to drop, and too few valid take nothing."""
    core, sink = control(eta=1, batch=2, prox_mode=ProxMode.loglinear)
    ids = [core.admit() for _ in range(4)]
    core.set_version(1)
    for rid, versions in zip(ids, ([0], [1], [0, 1], [1]), strict=True):
        core.finish(rid, group(versions))  # type: ignore[arg-type]
    assert core.take_ahead(3, version=2) is None
    assert [i.group.rollout_id for i in core.buffered()] == ids
    assert not sink.of(SampleDroppedEvent) and core.last_take_dropped == 0

    batch = core.take_ahead(2, version=2, step=5)
    assert batch is not None
    assert [g.rollout_id for g in batch] == [ids[1], ids[3]]
    (taken,) = sink.of(BatchTakenEvent)
    assert (taken.version, taken.step, taken.head_lags) == (2, 5, [1, 1])
    assert core.version == 1 and not sink.of(SampleDroppedEvent)
    assert core.set_version(2) == 2
    assert {e.point for e in sink.of(SampleDroppedEvent)} == {"purge"}
    assert core.snapshot()["consumed"] == 2
    assert conservation_holds(core.snapshot())


def test_a_group_with_no_samples_is_rejected_not_dropped() -> None:
    core, sink = control()
    a, b = core.admit(), core.admit()
    assert a is not None and b is not None
    assert core.finish(a, None) is False
    assert core.finish(b, None, error="ValueError: boom") is False
    snap = core.snapshot()
    assert snap["rejected_by_reason"] == {"no_group": 1, "error": 1}
    assert snap["dropped_total"] == 0
    assert conservation_holds(snap)
    assert sink.of(RolloutFinishedEvent)[1].error == "ValueError: boom"


def test_finish_event_carries_versions_lags_tokens_segments_and_reward() -> None:
    core, sink = control(eta=3)
    rid = core.admit()
    assert rid is not None
    core.set_version(1)
    finished = group([0, 0, 1], [1, 1])
    finished.samples[0].reward = 1.0
    finished.samples[0].n_segments = 2
    core.finish(rid, finished)
    event = sink.of(RolloutFinishedEvent)[0]
    assert event == RolloutFinishedEvent(
        rollout_id=rid,
        version=1,
        accepted=True,
        reason=None,
        head_version=0,
        tail_version=1,
        head_lag=1,
        tail_lag=0,
        n_tokens=5,
        n_segments=2,
        reward=0.5,
    )
    assert finished.submit_version == 0


@pytest.mark.parametrize("strategy", ["standard", "segment_wise"])
def test_the_capacity_event_holds_the_managers_terms(strategy: str) -> None:
    core, _ = control(strategy=strategy)
    core.admit()
    event = core.capacity_event()
    snap = core.snapshot()
    for key, value in event.fields_dict().items():
        expected = core.buffer_size if key == "queue_size" else snap[key]
        assert value == expected, key
    assert event.running == 1
