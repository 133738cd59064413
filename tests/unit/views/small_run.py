"""A small run, written by hand through the event schema: a crafted scenario whose every number
can be computed by hand (test_inspect_staleness.py and test_dashboard.py assert them), with drops
of both reasons at both check points, a rejected rollout and weight-update phases. Runs that only
need a realistic log use the simulated one (`simulated_run_log` in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    CapacityEvent,
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunFinishedEvent,
    RunStartedEvent,
    SampleDroppedEvent,
    ServerStateEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)

# The run's settings: η = 2, B = 2, max_concurrent = 4, one server.
ETA, B, MAX_CONCURRENT, ADDRESS = 2, 2, 4, "127.0.0.1:8001"


def submitted(ts: float, rollout_id: int, version: int) -> RolloutSubmittedEvent:
    return RolloutSubmittedEvent(ts=ts, rollout_id=rollout_id, version=version)


def capacity(
    ts: float,
    version: int,
    running: int,
    accepted_live: int,
    submitted: int,
    queue_size: int,
    *,
    rejected: int = 0,
    dropped_total: int = 0,
    consumed: int = 0,
) -> CapacityEvent:
    """The executor's capacity at `version`: its rooms follow from the counts (η+v+1)·B."""
    limit = (ETA + version + 1) * B
    concurrency_room = MAX_CONCURRENT - running
    staleness_room = limit - (accepted_live + running)
    return CapacityEvent(
        ts=ts,
        version=version,
        max_concurrent=MAX_CONCURRENT,
        running=running,
        accepted_live=accepted_live,
        staleness_limit=limit,
        concurrency_room=concurrency_room,
        staleness_room=staleness_room,
        capacity=min(concurrency_room, staleness_room),
        submitted=submitted,
        rejected=rejected,
        dropped_total=dropped_total,
        consumed=consumed,
        queue_size=queue_size,
    )


def lags(version: int, versions: tuple[int, int]) -> dict[str, int]:
    """The version fields of a rollout whose head and tail were generated under `versions`,
    seen at `version`."""
    head, tail = versions
    return {
        "head_version": head,
        "tail_version": tail,
        "head_lag": version - head,
        "tail_lag": version - tail,
    }


def finished(
    ts: float,
    rollout_id: int,
    version: int,
    versions: tuple[int, int],
    n_tokens: int,
    n_segments: int,
    reward: float,
    reason: str | None = None,
) -> RolloutFinishedEvent:
    """Rollout `rollout_id` finished at `version`, its head and tail generated under
    `versions`; accepted unless a `reason` is given."""
    return RolloutFinishedEvent(
        ts=ts,
        rollout_id=rollout_id,
        version=version,
        accepted=reason is None,
        reason=reason,
        **lags(version, versions),
        n_tokens=n_tokens,
        n_segments=n_segments,
        reward=reward,
    )


def dropped(
    ts: float, rollout_id: int, reason: str, point: str, version: int, versions: tuple[int, int]
) -> SampleDroppedEvent:
    return SampleDroppedEvent(
        ts=ts,
        rollout_id=rollout_id,
        reason=reason,
        point=point,
        version=version,
        **lags(version, versions),
    )


def batch(
    ts: float,
    step: int,
    ids: list[int],
    head_lags: list[int],
    tokens: dict[str, int],
    wait_s: float,
) -> BatchTakenEvent:
    """The batch of step `step`, taken at version `step` (every tail generated at it)."""
    return BatchTakenEvent(
        ts=ts,
        step=step,
        version=step,
        rollout_ids=ids,
        head_lags=head_lags,
        tail_lags=[0] * len(ids),
        tokens_by_lag=tokens,
        wait_s=wait_s,
    )


def train_step(ts: float, step: int, reward: float, loss: float, tokens: int) -> TrainStepEvent:
    """Step `step` at version `step`: B·n = 4 samples in 1.0 s."""
    return TrainStepEvent(
        ts=ts,
        step=step,
        version=step,
        reward=reward,
        loss=loss,
        clip_frac=0.1,
        behav_weight_mean=1.0,
        behav_weight_max=1.2,
        masked_frac=0.0,
        samples=4,
        tokens=tokens,
        step_s=1.0,
        samples_per_s=4.0,
        gen_tokens_per_s=float(tokens),
    )


def weight_update(
    ts: float,
    version: int,
    total_s: float,
    recompute_s: float | None,
    finish_s: tuple[float, float],
) -> WeightUpdateEvent:
    """The update to `version`: pause 0.1 s, the recompute (`None`: the update has none),
    export 0.3 s, reload 0.1 s, then set_version and resume in `finish_s`."""
    recompute = {} if recompute_s is None else {"recompute_s": recompute_s}
    set_version_s, resume_s = finish_s
    phases = {"pause_s": 0.1, **recompute, "export_s": 0.3, "reload_s": 0.1}
    phases |= {"set_version_s": set_version_s, "resume_s": resume_s}
    return WeightUpdateEvent(ts=ts, version=version, phases=phases, total_s=total_s)


def server(ts: float, state: str, version: int) -> ServerStateEvent:
    return ServerStateEvent(
        ts=ts, address=ADDRESS, state=state, version=version, restarts=0, server=0
    )


def small_run_events() -> list[Event]:
    """A 4-step run small enough to compute every number by hand (test_inspect_staleness.py
    does): η=2, B=2, max_concurrent=4, segment_wise, one server. Built through the schema, so
    a renamed field breaks here."""
    return [
        RunStartedEvent(
            ts=1000.0,
            run="small",
            steps=4,
            max_staleness=ETA,
            batch_size=B,
            strategy="segment_wise",
            prox_mode="segment",
            n_samples=2,
            max_concurrent=MAX_CONCURRENT,
            server_count=1,
        ),
        server(1000.1, "starting", 0),
        server(1001.0, "ready", 0),
        # capacity(ts, version, running, accepted_live, ...), finished(ts, id, version,
        # (head version, tail version), ...).
        # v0: rollouts 1-4, then 5-6 as 1 and 2 finish; batch [1, 2].
        submitted(1001.1, 1, 0),
        submitted(1001.2, 2, 0),
        submitted(1001.3000000000001, 3, 0),
        submitted(1001.4, 4, 0),
        capacity(1001.5, 0, 4, 0, submitted=4, queue_size=0),
        finished(1003.0, 1, 0, (0, 0), n_tokens=10, n_segments=1, reward=0.0),
        finished(1003.5, 2, 0, (0, 0), n_tokens=12, n_segments=1, reward=1.0),
        capacity(1003.6, 0, 2, 2, submitted=4, queue_size=2),
        submitted(1003.7, 5, 0),
        submitted(1003.8, 6, 0),
        capacity(1003.9, 0, 4, 2, submitted=6, queue_size=2),
        batch(1004.0, 0, [1, 2], [0, 0], {"0": 22}, wait_s=3.0),
        train_step(1005.0, 0, reward=0.5, loss=0.4, tokens=22),
        weight_update(1005.8, 1, 0.8, recompute_s=0.2, finish_s=(0.05, 0.05)),
        server(1005.85, "ready", 1),
        # v1: 3, 5 and 6 finish; 7-8 submitted; batch [3, 5].
        finished(1006.0, 3, 1, (0, 1), n_tokens=16, n_segments=2, reward=1.0),
        finished(1006.2, 5, 1, (0, 1), n_tokens=10, n_segments=2, reward=0.5),
        finished(1006.3, 6, 1, (0, 0), n_tokens=8, n_segments=1, reward=0.0),
        capacity(1006.4, 1, 1, 5, submitted=6, queue_size=3, consumed=2),
        submitted(1006.5, 7, 1),
        submitted(1006.6, 8, 1),
        capacity(1006.7, 1, 3, 5, submitted=8, queue_size=3, consumed=2),
        batch(1006.8, 1, [3, 5], [1, 1], {"0": 14, "1": 12}, wait_s=1.0),
        train_step(1007.8, 1, reward=0.75, loss=0.3, tokens=26),
        weight_update(1008.4, 2, 0.6, recompute_s=None, finish_s=(0.05, 0.05)),
        # v2: 6 (all of it at v0) is purged; 9-11 submitted; batch [7, 8].
        dropped(1008.45, 6, "no_recompute", "purge", 2, (0, 0)),
        server(1008.46, "ready", 2),
        capacity(1008.5, 2, 3, 4, submitted=8, queue_size=0, dropped_total=1, consumed=4),
        submitted(1008.6, 9, 2),
        capacity(1008.7, 2, 4, 4, submitted=9, queue_size=0, dropped_total=1, consumed=4),
        finished(1009.0, 7, 2, (1, 2), n_tokens=12, n_segments=2, reward=1.0),
        finished(1009.2, 8, 2, (1, 2), n_tokens=14, n_segments=2, reward=0.0),
        capacity(1009.3, 2, 2, 6, submitted=9, queue_size=2, dropped_total=1, consumed=4),
        submitted(1009.4, 10, 2),
        submitted(1009.5, 11, 2),
        capacity(1009.6, 2, 4, 6, submitted=11, queue_size=2, dropped_total=1, consumed=4),
        batch(1009.9, 2, [7, 8], [1, 1], {"0": 16, "1": 10}, wait_s=1.5),
        train_step(1010.9, 2, reward=0.5, loss=0.2, tokens=26),
        weight_update(1011.6, 3, 0.7, recompute_s=0.15, finish_s=(0.03, 0.02)),
        server(1011.65, "ready", 3),
        # v3: 4 finishes with head lag 3 (dropped), 10 is filtered out; batch [9, 11].
        finished(1011.7, 4, 3, (0, 3), n_tokens=24, n_segments=4, reward=1.0, reason="head_lag"),
        dropped(1011.7, 4, "head_lag", "finish", 3, (0, 3)),
        finished(1011.8, 10, 3, (2, 3), n_tokens=9, n_segments=2, reward=0.0, reason="filtered"),
        finished(1012.0, 9, 3, (2, 3), n_tokens=10, n_segments=2, reward=1.0),
        finished(1012.5, 11, 3, (2, 3), n_tokens=8, n_segments=2, reward=1.0),
        capacity(
            1012.6, 3, 0, 8, submitted=11, queue_size=2, rejected=1, dropped_total=2, consumed=6
        ),
        batch(1012.8, 3, [9, 11], [1, 1], {"0": 9, "1": 9}, wait_s=1.2),
        train_step(1013.8, 3, reward=1.0, loss=0.1, tokens=18),
        RunFinishedEvent(ts=1013.9, steps=4, wall_s=13.9, version=3),
    ]


# A line of a type this sdp does not know, and the cut last line of a run killed mid-write.
FOREIGN_LINE = '{"ts": 1006.25, "type": "future_event", "note": "written by a newer sdp"}'
CUT_LINE = '{"ts": 1014.0, "type": "train_st'


def write_small_run_log(path: Path) -> Path:
    """PATH (RUN_DIR/events.jsonl) of the small run, written by EventLog, with one event of an
    unknown type in the middle and a truncated last line."""
    events = small_run_events()
    with EventLog(path) as log:
        for event in events[:20]:
            log.emit(event)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(FOREIGN_LINE + "\n")
    with EventLog(path) as log:
        for event in events[20:]:
            log.emit(event)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(CUT_LINE)
    return path
