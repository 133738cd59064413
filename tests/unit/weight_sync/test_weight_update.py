"""The weight-update sequence shared by `sdp train` and `sdp simulate`, against fake servers:
every sample buffered under v is scored under v before the servers load v+1, including the
ones that finish while the recompute is under way; and a stop does not wait for a stuck scorer."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.run_plan import needs_proximal_recompute
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.events.event_log import EventRecorder, NullEventLog
from sdp_cli.events.event_schema import WeightUpdateEvent
from sdp_cli.rollout.executor import ExecutorStopped, Gate, RolloutExecutor
from sdp_cli.rollout.recompute import count_missing_recompute
from sdp_cli.rollout.staleness import conservation_holds
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.weight_sync.sequence import WeightUpdate

# Tokens made before the update's version; the recompute at v = 1 rewrites them.
OLD_VERSION = 0
SCORE = -0.25
# Restored at version 1 with B = 1, the executor numbers rollouts from 1.
FIRST = 1


class FakeServers:
    """Hold version 1; a live segment runs until the test releases its rollout or the
    servers abort it. Records the order of what the sequence asks of them."""

    def __init__(self) -> None:
        self.version = 1
        self.calls: list[str] = []
        self.released: set[int] = set()
        self.changed = asyncio.Event()

    async def generate(self, rollout_id: int) -> str:
        """'stop' once released, 'abort' when an abort comes first."""
        aborts = self.calls.count("abort")
        while rollout_id not in self.released:
            if self.calls.count("abort") != aborts:
                return "abort"
            self.changed.clear()
            await self.changed.wait()
        return "stop"

    def release(self, rollout_id: int) -> None:
        self.released.add(rollout_id)
        self.changed.set()

    async def abort_generation(self) -> None:
        self.calls.append("abort")
        self.changed.set()

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        self.calls.append("load")
        self.version = version
        return {}


class TwoSegmentWorkflow:
    """One completion per rollout: three tokens of version 0 (made before), then a live segment
    of two tokens under the servers' version that ends when released; an aborted segment parks
    at the gate and continues after the update."""

    def __init__(self, servers: FakeServers) -> None:
        self.servers = servers

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
        versions = [OLD_VERSION] * 3
        while True:
            await gate()
            version = self.servers.version
            finish = await self.servers.generate(rollout_id)
            if finish == "stop":
                versions += [version, version]
                break
        sample = Trajectory(
            prompt_ids=[1, 2],
            output_ids=[5] * len(versions),
            behav_logprobs=[-1.0] * len(versions),
            versions=versions,
        )
        return RolloutGroup(rollout_id=rollout_id, samples=[sample])


class SlowScorer:
    """Takes `delay` seconds per call; calls `on_first_call` when the first call starts."""

    def __init__(self, servers: FakeServers, delay: float, on_first_call: Any = None) -> None:
        self.servers = servers
        self.delay = delay
        self.on_first_call = on_first_call
        self.calls = 0
        self.versions_seen: list[int] = []

    async def __call__(self, samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        self.calls += 1
        if self.calls == 1 and self.on_first_call is not None:
            self.on_first_call()
        await asyncio.sleep(self.delay)
        self.versions_seen.append(self.servers.version)
        return [[SCORE] * len(output) for _, output in samples]


async def no_export(version: int) -> Path | None:
    return None


def make_executor(servers: FakeServers, scorer: Any, **rollout: Any) -> RolloutExecutor:
    cfg = RolloutConfig(
        **{
            "max_staleness": 4,
            "batch_size": 1,
            "max_concurrent": 3,
            "recompute_early": False,
            **rollout,
        }
    )
    executor = RolloutExecutor(
        TwoSegmentWorkflow(servers), cfg, ProxMode.segment, scorer=scorer, capacity_interval_s=0
    )
    executor.restore(1)
    return executor


def test_a_rollout_that_finishes_mid_recompute_is_scored_before_the_servers_reload() -> None:
    servers = FakeServers()
    # The second rollout finishes while the first scoring call (of the first) is still running.
    scorer = SlowScorer(servers, delay=0.3, on_first_call=lambda: servers.release(FIRST + 1))
    executor = make_executor(servers, scorer)
    servers.release(FIRST)
    executor.start()
    try:
        deadline = time.monotonic() + 5
        while executor.snapshot()["queue_size"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        update = WeightUpdate(executor, servers, no_export, True, NullEventLog(), abort_every_s=0.2)
        result = executor.run_sync(update.run(1), timeout=10)
        # The third rollout was still generating: the abort parked it at the gate instead.
        assert servers.calls[0] == "abort" and servers.calls[-1] == "load"
        assert result.settled and result.recompute is not None
        assert result.recompute.samples == 2 and scorer.calls == 2
        assert scorer.versions_seen == [1, 1], "every score taken before the reload"
        assert executor.snapshot()["recompute_missed"] == 0
        groups = executor.take(2, timeout=5)
    finally:
        executor.stop()
    by_id = {g.rollout_id: g.samples[0] for g in groups}
    assert sorted(by_id) == [FIRST, FIRST + 1]
    for sample in by_id.values():
        assert sample.recompute_version == 1
        assert sample.proximal_logprobs()[:3] == [SCORE] * 3
        # Tokens of version 1 keep p = μ.
        assert sample.proximal_logprobs()[3:] == [-1.0, -1.0]


class GatedReloadServers(FakeServers):
    """FakeServers whose reload waits until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.reload_open = False

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        self.calls.append("load started")
        while not self.reload_open:
            self.changed.clear()
            await self.changed.wait()
        return await super().load_weights(weights, version)

    async def open_reload(self) -> None:
        self.reload_open = True
        self.changed.set()


class GatedServers(GatedReloadServers):
    """GatedReloadServers whose abort also waits until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.abort_open = False

    async def abort_generation(self) -> None:
        while not self.abort_open:
            self.changed.clear()
            await self.changed.wait()
        await super().abort_generation()

    async def open_all(self) -> None:
        self.abort_open = True
        await self.open_reload()


def update_over_buffer(
    servers: FakeServers, count: int
) -> tuple[RolloutExecutor, WeightUpdate, EventRecorder]:
    """A started executor with `count` finished rollouts buffered (tokens of versions 0, 1),
    and a weight update over it that records its events."""
    executor = make_executor(servers, SlowScorer(servers, delay=0.0), max_concurrent=count)
    for rollout_id in range(FIRST, FIRST + count):
        servers.release(rollout_id)
    executor.start()
    deadline = time.monotonic() + 5
    while executor.snapshot()["queue_size"] < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    events = EventRecorder()
    return executor, WeightUpdate(executor, servers, no_export, True, events), events


def test_take_next_hands_over_the_scored_batch_while_the_servers_still_reload() -> None:
    servers = GatedReloadServers()
    executor, update, events = update_over_buffer(servers, count=2)
    try:
        result = executor.run_sync(update.run(1, take_next=2, step=3), timeout=10)
        assert result.next_batch is not None
        assert sorted(g.rollout_id for g in result.next_batch) == [FIRST, FIRST + 1]
        for group in result.next_batch:
            assert group.samples[0].recompute_version == 1
            assert group.samples[0].proximal_logprobs()[:3] == [SCORE] * 3
        # Handed over before the reload is done: the servers and the executor are still at 1.
        assert servers.calls[-1] == "load started"
        assert servers.version == 1 and executor.version == 1
        assert not events.of(WeightUpdateEvent)
        executor.run_sync(servers.open_reload())
        executor.run_sync(update.finished(), timeout=10)
        assert servers.calls[-1] == "load" and servers.version == 2 and executor.version == 2
        assert not executor.paused
        snapshot = executor.snapshot()
        # The restore to version 1 counts B = 1 as consumed already.
        assert snapshot["consumed"] == 1 + 2 and conservation_holds(snapshot)
    finally:
        executor.stop()
    (event,) = events.of(WeightUpdateEvent)
    assert event.trainer_wait_s is not None and event.trainer_wait_s < event.total_s
    assert event.version == 2


def test_take_next_hands_over_early_scored_groups_before_the_recompute() -> None:
    """Groups whose version-0 tokens already have their early scores (here the trainer's,
    rollout.recompute_on=trainer style) need nothing more: the batch comes before any
    scoring call and the rest of the update runs behind it."""
    servers = GatedServers()
    executor, update, events = update_over_buffer(servers, count=2)
    trainer_score = -0.5
    try:
        jobs = executor.run_sync(executor.proximal_jobs_async(1))
        assert len(jobs) == 2
        scores = [[trainer_score] * len(sample.output_ids) for sample, _ in jobs]
        executor.run_sync(executor.keep_proximal_async(jobs, scores, 1))
        result = executor.run_sync(update.run(1, take_next=2), timeout=10)
        assert result.next_batch is not None and len(result.next_batch) == 2
        for group in result.next_batch:
            assert group.samples[0].recompute_version == 1
            assert group.samples[0].proximal_logprobs() == [trainer_score] * 3 + [-1.0] * 2
        # Handed over before the abort (which cannot pass its gate yet) and the reload.
        assert servers.calls == []
        executor.run_sync(servers.open_all())
        executor.run_sync(update.finished(), timeout=10)
        assert servers.calls[-1] == "load" and executor.version == 2
        assert conservation_holds(executor.snapshot())
    finally:
        executor.stop()
    (event,) = events.of(WeightUpdateEvent)
    assert event.trainer_wait_s is not None and event.trainer_wait_s < event.total_s


def test_take_next_waits_for_a_running_rollout_that_completes_the_batch() -> None:
    """One group is buffered and one still running when the update starts: it is worth
    waiting up to a reload's time for it instead of running the whole update first."""
    servers = GatedReloadServers()
    cfg = RolloutConfig(max_staleness=4, batch_size=1, max_concurrent=2, recompute_early=False)
    workflow = TwoSegmentWorkflow(servers)
    executor = RolloutExecutor(workflow, cfg, ProxMode.loglinear, capacity_interval_s=0)
    executor.restore(1)
    servers.release(FIRST)
    executor.start()
    update = WeightUpdate(executor, servers, no_export, False, NullEventLog())
    # As if the last reload had taken 5 s.
    update._last_reload_s = 5.0
    try:
        deadline = time.monotonic() + 5
        while executor.snapshot()["queue_size"] < 1 or executor.snapshot()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def update_while_the_rollout_finishes() -> Any:
            asyncio.get_running_loop().call_later(0.3, servers.release, FIRST + 1)
            return await update.run(1, take_next=2)

        # The reload is gated: without the early hand-over this would not return.
        result = executor.run_sync(update_while_the_rollout_finishes(), timeout=10)
        assert result.next_batch is not None
        assert [g.rollout_id for g in result.next_batch] == [FIRST, FIRST + 1]
        assert 0.25 <= result.phases["take_next_s"] < 5
        executor.run_sync(servers.open_reload())
        executor.run_sync(update.finished(), timeout=10)
        assert executor.version == 2 and conservation_holds(executor.snapshot())
    finally:
        executor.stop()


def test_take_next_without_a_full_batch_takes_nothing_and_waits_for_the_reload() -> None:
    servers = FakeServers()
    executor, update, events = update_over_buffer(servers, count=1)
    try:
        result = executor.run_sync(update.run(1, take_next=2), timeout=10)
        assert result.next_batch is None
        assert servers.version == 2 and executor.version == 2
        assert executor.snapshot()["queue_size"] == 1
    finally:
        executor.stop()
    (event,) = events.of(WeightUpdateEvent)
    assert event.trainer_wait_s == event.total_s


def test_without_the_abort_and_second_pass_the_late_sample_is_missed() -> None:
    """The counter the simulator reports can fail: one scoring pass misses the late rollout."""
    servers = FakeServers()
    scorer = SlowScorer(servers, delay=0.3, on_first_call=lambda: servers.release(FIRST + 1))
    executor = make_executor(servers, scorer)
    servers.release(FIRST)
    executor.start()
    try:
        deadline = time.monotonic() + 5
        while executor.snapshot()["queue_size"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def single_pass() -> None:
            await executor.pause_async()
            await executor.recompute_async(1)
            await asyncio.sleep(0.05)  # the second rollout lands in the buffer after the pass
            await servers.load_weights(None, 2)
            await executor.set_version_async(2)

        executor.run_sync(single_pass(), timeout=10)
        assert executor.snapshot()["recompute_missed"] == 1
    finally:
        executor.stop()


def test_settle_waits_for_a_rollout_whose_segment_is_still_running() -> None:
    servers = FakeServers()
    executor = make_executor(servers, SlowScorer(servers, delay=0.0), max_concurrent=1)
    executor.start()
    try:
        deadline = time.monotonic() + 5
        while executor.snapshot()["running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        executor.pause()

        async def settle(timeout: float) -> bool:
            return await executor.settle_async(timeout)

        # Generating and not aborted: not settled.
        assert executor.run_sync(settle(0.1), timeout=5) is False
        executor.run_sync(servers.abort_generation(), timeout=5)
        assert executor.run_sync(settle(2.0), timeout=5) is True
    finally:
        executor.stop()


def test_a_stop_during_a_stuck_recompute_ends_at_once() -> None:
    servers = FakeServers()
    entered = threading.Event()

    async def never_returns(samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        entered.set()
        await asyncio.Event().wait()
        return []

    executor = make_executor(servers, never_returns)
    servers.release(FIRST)
    executor.start()
    deadline = time.monotonic() + 5
    while executor.snapshot()["queue_size"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    update = WeightUpdate(executor, servers, no_export, True, NullEventLog())
    outcome: list[BaseException] = []

    def run_update() -> None:
        try:
            executor.run_sync(update.run(1))
        except BaseException as exc:
            outcome.append(exc)

    trainer = threading.Thread(target=run_update)
    trainer.start()
    assert entered.wait(5)
    started = time.monotonic()
    leftovers = executor.stop(timeout=5)
    stop_s = time.monotonic() - started
    trainer.join(5)
    assert stop_s < 1.0, f"stop took {stop_s:.2f} s"
    assert [type(e) for e in outcome] == [ExecutorStopped]
    # The group the stuck recompute held is handed back, not lost.
    assert [g.rollout_id for g in leftovers] == [FIRST]


@pytest.mark.parametrize("mode", list(ProxMode))
def test_one_place_says_which_prox_modes_need_the_recompute(mode: ProxMode) -> None:
    assert needs_proximal_recompute(mode) == (mode == ProxMode.segment)


def test_missing_recompute_counts_samples_with_unscored_previous_version_tokens() -> None:
    def group(versions: list[int], recompute_version: int = -1) -> RolloutGroup:
        sample = Trajectory([1], [5] * len(versions), [-1.0] * len(versions), versions)
        sample.recompute_version = recompute_version
        return RolloutGroup(rollout_id=0, samples=[sample])

    groups = [group([0, 1]), group([1, 1]), group([0, 1], recompute_version=1), group([0])]
    assert count_missing_recompute(groups, 1) == 2


def test_keep_mode_holds_what_finishes_after_the_last_pass_and_never_aborts() -> None:
    """train.update_mode=keep: no abort reaches the servers; a rollout that finishes after the
    second pass, while the servers reload, waits outside the buffer and is accepted at v+1, so
    no buffered sample misses the recompute; its v−1 tokens keep p = μ (it was not buffered
    under v), as the proximal rule says."""
    servers = GatedReloadServers()
    scorer = SlowScorer(servers, delay=0.0)
    executor = make_executor(servers, scorer, max_concurrent=2)
    servers.release(FIRST)
    executor.start()
    try:
        deadline = time.monotonic() + 5
        while executor.snapshot()["queue_size"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        events = EventRecorder()
        update = WeightUpdate(executor, servers, no_export, True, events, keep_requests=True)
        # Hand the trainer no batch, so that run() returns after the reload.
        pool = ThreadPoolExecutor(1)
        done = pool.submit(executor.run_sync, update.run(1), 10)
        while servers.calls[-1:] != ["load started"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        servers.release(FIRST + 1)
        time.sleep(0.2)
        # Finished, but held: not in the buffer under version 1.
        assert executor.snapshot()["queue_size"] == 1
        executor.run_sync(servers.open_reload())
        result = done.result(timeout=10)
        pool.shutdown()
        while executor.snapshot()["queue_size"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "abort" not in servers.calls
        assert result.settled and "abort_s" not in result.phases
        assert executor.snapshot()["recompute_missed"] == 0
        groups = executor.take(2, timeout=5)
    finally:
        executor.stop()
    by_id = {g.rollout_id: g.samples[0] for g in groups}
    assert by_id[FIRST].recompute_version == 1
    assert by_id[FIRST].proximal_logprobs()[:3] == [SCORE] * 3
    assert by_id[FIRST + 1].proximal_logprobs() == [-1.0] * 5
    (event,) = events.of(WeightUpdateEvent)
    assert event.update_mode == "keep"
    assert event.generation_pause_s is not None
    assert 0 < event.generation_pause_s <= event.total_s
