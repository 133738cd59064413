"""The threaded executor: the trainer-facing API, pause/resume, shutdown, events."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sdp_cli.config.rollout_settings import RolloutConfig, Strategy
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.errors import EpisodeRejected
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    CapacityEvent,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    SampleDroppedEvent,
)
from sdp_cli.rollout.executor import (
    ExecutorError,
    ExecutorStopped,
    Gate,
    RolloutExecutor,
    TakeTimeout,
)
from sdp_cli.rollout.staleness import conservation_holds
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.simulate.clock import VirtualTimeLoop


def trajectory(versions: list[int], reward: float = 1.0) -> Trajectory:
    return Trajectory(
        prompt_ids=[1, 2],
        output_ids=[7] * len(versions),
        behav_logprobs=[-1.0] * len(versions),
        versions=versions,
        reward=reward,
    )


class SegmentedWorkflow:
    """Each completion is `segments` segments; a segment takes `delay()` seconds and its tokens
    carry the version the test's `current_version()` reports when it starts."""

    def __init__(
        self,
        current_version: Callable[[], int],
        segments: int = 1,
        delay: Callable[[], float] = lambda: 0.0,
        n_samples: int = 2,
    ) -> None:
        self.current_version = current_version
        self.segments = segments
        self.delay = delay
        self.n_samples = n_samples
        self.segments_started = 0

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
        samples = []
        for _ in range(self.n_samples):
            versions: list[int] = []
            for _ in range(self.segments):
                await gate()
                self.segments_started += 1
                version = self.current_version()
                wait = self.delay()
                if wait:
                    await asyncio.sleep(wait)
                versions += [version, version]
            samples.append(trajectory(versions))
        return RolloutGroup(rollout_id=rollout_id, samples=samples)


def rollout_cfg(**overrides: Any) -> RolloutConfig:
    base: dict[str, Any] = {"max_staleness": 1, "batch_size": 2, "max_concurrent": 4}
    return RolloutConfig(**{**base, **overrides})


def executor_for(
    workflow: Any,
    sink: EventRecorder | None = None,
    prox_mode: ProxMode = ProxMode.loglinear,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    **cfg: Any,
) -> RolloutExecutor:
    return RolloutExecutor(
        workflow, rollout_cfg(**cfg), prox_mode, events=sink, loop_factory=loop_factory
    )


def wait_on_executor_clock(ex: RolloutExecutor, seconds: float = 3600.0) -> None:
    """Let `seconds` pass on the executor's own loop. On the virtual clock an hour takes an
    instant, and everything the loop would do in that hour (timers, segments, scoring) has run
    when this returns, so an assertion that nothing happened afterwards cannot pass by luck."""
    ex.run_sync(asyncio.sleep(seconds), timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


@pytest.fixture
def started() -> Any:
    executors: list[RolloutExecutor] = []

    def start(executor: RolloutExecutor, paused: bool = False) -> RolloutExecutor:
        executors.append(executor)
        executor.start(paused=paused)
        return executor

    yield start
    for executor in executors:
        executor.stop()


def test_take_serves_b_groups_in_order_and_stop_returns_the_untaken(started: Any) -> None:
    sink = EventRecorder()
    holder: dict[str, RolloutExecutor] = {}
    workflow = SegmentedWorkflow(lambda: holder["ex"].version)
    ex = holder["ex"] = executor_for(workflow, sink, max_staleness=1, batch_size=2)
    started(ex)
    batch = ex.take(2, timeout=5)
    assert [g.rollout_id for g in batch] == [0, 1]
    assert all(g.head_lag(0) == 0 for g in batch)
    wait_until(lambda: ex.snapshot()["queue_size"] == 2)  # (η+1)·B − B more were admitted
    leftovers = ex.stop()
    snap = ex.snapshot()
    assert [g.rollout_id for g in leftovers] == [2, 3]
    assert snap["accepted_total"] == snap["consumed"] + snap["drained"] == 4
    assert snap["running"] == 0
    assert conservation_holds(snap)
    assert ex.stop() == []
    taken = sink.of(BatchTakenEvent)
    assert taken[0].rollout_ids == [0, 1]
    assert taken[0].tokens_by_lag == {"0": 8}
    assert len(sink.of(RolloutSubmittedEvent)) == 4


def test_take_timeout_shows_the_counters(started: Any) -> None:
    ex = started(executor_for(SegmentedWorkflow(lambda: 0)), paused=True)
    started_at = time.monotonic()
    with pytest.raises(TakeTimeout) as info:
        ex.take(2, timeout=0.05)
    assert time.monotonic() - started_at < 2
    message = str(info.value)
    for part in ("paused=True", "submitted=0", "queue=0", "capacity=4", "version 0"):
        assert part in message


def test_pause_stops_new_submissions_and_new_segments(started: Any) -> None:
    # Endless completions of one-second segments on the virtual clock.
    workflow = SegmentedWorkflow(lambda: 0, segments=10**9, delay=lambda: 1.0, n_samples=1)
    ex = started(
        executor_for(
            workflow,
            loop_factory=VirtualTimeLoop,
            max_concurrent=3,
            batch_size=10,
            max_staleness=0,
        )
    )
    wait_until(lambda: workflow.segments_started >= 5)
    ex.pause()
    submitted = ex.snapshot()["submitted"]
    # A segment that passed its gate just before the pause may still be starting.
    wait_on_executor_clock(ex)
    segments = workflow.segments_started
    wait_on_executor_clock(ex)
    assert workflow.segments_started == segments
    assert ex.snapshot()["submitted"] == submitted
    assert ex.paused and ex.snapshot()["paused"]
    ex.resume()
    wait_until(lambda: workflow.segments_started > segments)


def test_version_change_purges_stale_groups(started: Any) -> None:
    sink = EventRecorder()
    holder: dict[str, RolloutExecutor] = {}
    workflow = SegmentedWorkflow(lambda: holder["ex"].version)
    ex = holder["ex"] = executor_for(
        workflow, sink, prox_mode=ProxMode.segment, max_staleness=0, batch_size=2
    )
    started(ex)
    wait_until(lambda: ex.snapshot()["queue_size"] == 2)
    ex.pause()
    assert ex.set_version(1) == 2
    dropped = sink.of(SampleDroppedEvent)
    assert [(e.point, e.reason, e.head_lag) for e in dropped] == [
        ("purge", "head_lag", 1),
        ("purge", "head_lag", 1),
    ]
    ex.resume()
    batch = ex.take(2, timeout=5)
    assert all(v == 1 for g in batch for s in g.samples for v in s.versions)
    assert conservation_holds(ex.snapshot())


def test_a_version_change_alone_reopens_admission(started: Any) -> None:
    """After a take the staleness room is 0 and nothing runs; only the new version adds B.
    If set_version did not wake the submitter, the next take would wait forever."""
    holder: dict[str, RolloutExecutor] = {}
    workflow = SegmentedWorkflow(lambda: holder["ex"].version)
    ex = holder["ex"] = executor_for(workflow, max_staleness=0, batch_size=2)
    started(ex)
    ex.take(2, timeout=5)
    wait_until(lambda: ex.snapshot()["running"] == 0)
    assert ex.snapshot()["capacity"] == 0
    ex.set_version(1)
    batch = ex.take(2, timeout=5)
    assert [g.submit_version for g in batch] == [1, 1]


def test_recompute_proximal_runs_over_the_buffer(started: Any) -> None:
    calls: list[threading.Thread] = []

    async def scorer(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        calls.append(threading.current_thread())
        return [[-3.0] * len(output_ids) for _, output_ids in samples]

    class TwoVersionWorkflow:
        async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
            await gate()
            return RolloutGroup(rollout_id, [trajectory([0, 1, 1])])

    ex = RolloutExecutor(
        TwoVersionWorkflow(),
        rollout_cfg(max_staleness=2, batch_size=2, max_concurrent=2),
        ProxMode.segment,
        scorer=scorer,
    )
    ex.restore(1)
    started(ex, paused=True)
    ex.resume()
    wait_until(lambda: ex.snapshot()["queue_size"] == 6)  # (η + v + 1)·B − v·B
    ex.pause()
    stats = ex.recompute_proximal(1)
    assert (stats.samples, stats.tokens, stats.failures) == (6, 6, 0)
    assert {t.name for t in calls} == {"sdp-rollout-executor"}
    for group in ex.drain():
        (sample,) = group.samples
        assert sample.prox_logprobs == [-3.0, -1.0, -1.0]
        assert sample.recompute_version == 1


class OneSampleTwoVersions:
    """Every rollout is one sample with a v0 token and two v1 tokens."""

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
        await gate()
        return RolloutGroup(rollout_id, [trajectory([0, 1, 1])])


def segment_executor(
    scorer: Any,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    **cfg: Any,
) -> RolloutExecutor:
    return RolloutExecutor(
        OneSampleTwoVersions(),
        rollout_cfg(**{"max_staleness": 2, "batch_size": 2, "max_concurrent": 2, **cfg}),
        ProxMode.segment,
        scorer=scorer,
        loop_factory=loop_factory,
    )


def test_after_a_take_the_rest_is_scored_early_and_the_update_only_writes(
    started: Any,
) -> None:
    batches: list[int] = []

    async def scorer(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        batches.append(len(samples))
        return [[-3.0] * len(output_ids) for _, output_ids in samples]

    ex = segment_executor(scorer, loop_factory=VirtualTimeLoop)
    ex.restore(1)
    started(ex)
    wait_until(lambda: ex.snapshot()["queue_size"] == 6)
    wait_on_executor_clock(ex)
    assert batches == []  # before this version's take the trainer may still take them
    taken = ex.take(2, timeout=5)
    wait_until(lambda: batches == [4])
    ex.pause()
    stats = ex.recompute_proximal(1)
    assert (stats.samples, stats.early_samples, stats.batches) == (4, 4, 0)
    assert batches == [4]
    for group in taken:  # trained at v1 as if nothing had been scored early
        assert group.samples[0].prox_logprobs is None
    for group in ex.drain():
        assert group.samples[0].prox_logprobs == [-3.0, -1.0, -1.0]


def test_with_early_scoring_off_the_update_scores_the_buffer(started: Any) -> None:
    batches: list[int] = []

    async def scorer(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        batches.append(len(samples))
        return [[-3.0] * len(output_ids) for _, output_ids in samples]

    ex = segment_executor(scorer, loop_factory=VirtualTimeLoop, recompute_early=False)
    ex.restore(1)
    started(ex)
    wait_until(lambda: ex.snapshot()["queue_size"] == 6)
    ex.take(2, timeout=5)
    wait_on_executor_clock(ex)
    assert batches == []
    ex.pause()
    stats = ex.recompute_proximal(1)
    assert (stats.samples, stats.early_samples, stats.batches) == (4, 0, 1)
    assert batches == [4]


def test_the_update_waits_for_an_early_call_in_flight_and_uses_it(started: Any) -> None:
    release = threading.Event()
    batches: list[int] = []

    async def slow_scorer(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        batches.append(len(samples))
        while not release.is_set():
            await asyncio.sleep(0.002)
        return [[-3.0] * len(output_ids) for _, output_ids in samples]

    ex = segment_executor(slow_scorer)
    ex.restore(1)
    started(ex)
    wait_until(lambda: ex.snapshot()["queue_size"] == 6)
    ex.take(2, timeout=5)
    wait_until(lambda: batches == [4])
    ex.pause()
    threading.Timer(0.05, release.set).start()
    stats = ex.recompute_proximal(1)
    assert (stats.early_samples, stats.batches) == (4, 0)
    assert batches == [4]


def test_recompute_without_a_scorer_is_an_error(started: Any) -> None:
    ex = started(executor_for(SegmentedWorkflow(lambda: 0)), paused=True)
    with pytest.raises(ExecutorError, match="scorer"):
        ex.recompute_proximal(1)


def test_run_sync_runs_coroutines_on_the_executor_loop(started: Any) -> None:
    ex = started(executor_for(SegmentedWorkflow(lambda: 0)), paused=True)

    async def where() -> str:
        return threading.current_thread().name

    assert ex.run_sync(where(), timeout=5) == "sdp-rollout-executor"
    with pytest.raises(TimeoutError):
        ex.run_sync(asyncio.sleep(10), timeout=0.05)


def test_none_and_errors_are_rejected_and_the_rest_flows(started: Any) -> None:
    class FlakyWorkflow:
        async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> Any:
            if rollout_id % 3 == 1:
                return None
            if rollout_id % 3 == 2:
                raise RuntimeError("reward function crashed")
            return RolloutGroup(rollout_id, [trajectory([executor_version])])

    sink = EventRecorder()
    ex = started(executor_for(FlakyWorkflow(), sink, batch_size=2, max_staleness=0))
    batch = ex.take(2, timeout=5)
    assert [g.rollout_id for g in batch] == [0, 3]
    snap = ex.snapshot()
    assert snap["rejected_by_reason"]["no_group"] >= 1
    assert snap["rejected_by_reason"]["error"] >= 1
    assert conservation_holds(snap)
    errors = [e for e in sink.of(RolloutFinishedEvent) if e.reason == "error"]
    assert "reward function crashed" in (errors[0].error or "")


def test_an_environment_failure_is_a_rejection_logged_once_per_kind(
    started: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Episodes whose environment raises are rejected with reason environment, each kind of
    failure logged once, and they never count toward the executor giving up."""

    class EnvFailingWorkflow:
        async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> Any:
            if 1 <= rollout_id <= 6:
                kind = "step timeout" if rollout_id % 2 else "step RuntimeError"
                raise EpisodeRejected(kind, f"rollout {rollout_id}")
            return RolloutGroup(rollout_id, [trajectory([executor_version])])

    sink = EventRecorder()
    ex = RolloutExecutor(
        EnvFailingWorkflow(),
        rollout_cfg(batch_size=2, max_staleness=0),
        events=sink,
        max_consecutive_errors=2,
    )
    started(ex)
    with caplog.at_level("WARNING"):
        batch = ex.take(2, timeout=5)
        wait_until(lambda: ex.snapshot()["rejected_by_reason"].get("environment", 0) >= 6)
    # Six failures in a row did not stop the executor (max_consecutive_errors=2).
    assert [g.rollout_id for g in batch] == [0, 7]
    assert conservation_holds(ex.snapshot())
    rejected = [e for e in sink.of(RolloutFinishedEvent) if e.reason == "environment"]
    assert {e.error.split(":")[0] for e in rejected if e.error} == {
        "step timeout",
        "step RuntimeError",
    }
    logged = [r for r in caplog.records if "shown once per kind" in r.getMessage()]
    assert len(logged) == 2


def test_a_workflow_that_always_fails_fails_take_fast(started: Any) -> None:
    class BrokenWorkflow:
        async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> Any:
            raise ConnectionError("no servers")

    ex = RolloutExecutor(BrokenWorkflow(), rollout_cfg(), max_consecutive_errors=5)
    started(ex)
    with pytest.raises(ExecutorError, match="5 times in a row"):
        ex.take(2, timeout=30)
    assert ex.snapshot()["submitted"] <= 5 + 4


def test_stop_cancels_in_flight_rollouts_and_wakes_a_waiting_take(started: Any) -> None:
    class HangingWorkflow:
        async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> Any:
            await asyncio.Event().wait()

    ex = started(executor_for(HangingWorkflow(), max_concurrent=3))
    wait_until(lambda: ex.snapshot()["running"] == 3)
    outcome: list[BaseException] = []

    def trainer() -> None:
        try:
            ex.take(2, timeout=60)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=trainer)
    thread.start()
    time.sleep(0.02)
    assert ex.stop() == []
    thread.join(5)
    assert isinstance(outcome[0], ExecutorStopped)
    snap = ex.snapshot()
    assert snap["running"] == 0
    assert snap["rejected_by_reason"] == {"cancelled": 3}
    assert conservation_holds(snap)
    with pytest.raises(ExecutorStopped):
        ex.take(1, timeout=1)


def test_restore_continues_ids_and_bound(started: Any) -> None:
    holder: dict[str, RolloutExecutor] = {}
    ex = holder["ex"] = executor_for(
        SegmentedWorkflow(lambda: holder["ex"].version), batch_size=3, max_staleness=1
    )
    ex.restore(4)
    started(ex)
    batch = ex.take(3, timeout=5)
    assert [g.rollout_id for g in batch] == [12, 13, 14]
    snap = ex.snapshot()
    assert snap["version"] == 4
    assert snap["staleness_limit"] == (1 + 4 + 1) * 3
    with pytest.raises(Exception, match="restore"):
        ex.restore(5)


def test_capacity_events_carry_every_term_and_are_rate_limited(started: Any) -> None:
    sink = EventRecorder()
    workflow = SegmentedWorkflow(lambda: 0, delay=lambda: 0.001)
    ex = RolloutExecutor(
        workflow, rollout_cfg(max_staleness=50), events=sink, capacity_interval_s=60.0
    )
    started(ex)
    wait_until(lambda: ex.snapshot()["accepted_total"] >= 20)
    ex.stop()
    events = sink.of(CapacityEvent)
    # The first change, then (rate limited for 60 s) only the final state at shutdown.
    assert len(events) == 2
    assert events[-1].accepted_live == ex.snapshot()["accepted_live"]


def test_random_schedule_keeps_the_bound_and_conservation(started: Any) -> None:
    """A trainer thread running the weight-update protocol against rollouts of random length,
    while another thread polls snapshots: every batch respects η, every snapshot conserves."""
    rng = random.Random(7)
    holder: dict[str, RolloutExecutor] = {}
    workflow = SegmentedWorkflow(
        lambda: holder["ex"].version, segments=3, delay=lambda: rng.random() * 0.002
    )

    async def scorer(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        return [[-2.0] * len(output_ids) for _, output_ids in samples]

    eta, batch_size = 1, 3
    ex = holder["ex"] = RolloutExecutor(
        workflow,
        rollout_cfg(
            max_staleness=eta,
            batch_size=batch_size,
            max_concurrent=5,
            strategy=Strategy.segment_wise,
        ),
        ProxMode.segment,
        scorer=scorer,
    )
    started(ex)
    stop_polling = threading.Event()
    broken: list[dict[str, Any]] = []

    def poll() -> None:
        while not stop_polling.is_set():
            snap = ex.snapshot()
            if not conservation_holds(snap):
                broken.append(snap)
            time.sleep(0.0002)

    poller = threading.Thread(target=poll)
    poller.start()
    seen: set[int] = set()
    try:
        for _ in range(25):
            version = ex.version
            for group in ex.take(batch_size, timeout=10):
                assert group.rollout_id not in seen
                seen.add(group.rollout_id)
                assert group.head_lag(version) <= eta
            if rng.random() < 0.3:
                ex.pause()
                time.sleep(0.001)
                ex.resume()
            ex.pause()
            ex.recompute_proximal(version)
            ex.set_version(version + 1)
            ex.resume()
    finally:
        stop_polling.set()
        poller.join()
    assert broken == []
    assert ex.version == 25
    leftovers = ex.stop()
    snap = ex.snapshot()
    assert not {g.rollout_id for g in leftovers} & seen
    # Every accepted group was trained, handed back at shutdown, or dropped as stale.
    assert snap["accepted_live"] == snap["consumed"] + snap["drained"] == len(seen) + len(leftovers)
    assert conservation_holds(snap)
