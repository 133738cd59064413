"""The weight-update protocol: one sequence for `sdp train` and `sdp simulate`.

`sdp train` plugs in the actor's weight export and the vLLM servers (`disk.DiskTransport`);
`sdp simulate` a simulated export and simulated servers; each is a `transport.WeightTransport`.
The sequence (docs/design.md, Weight-update protocol):

1. pause the executor: no new segment starts.
2. prox_mode=segment: score the buffered samples under v (the servers still hold it) while the
   new weights are exported and while requests already on the servers keep generating under v.
3. prox_mode=segment: the servers abort what they are generating and keep serving; the executor
   waits until no running rollout can finish before it resumes (each waits at the closed gate
   or has ended); a second pass then scores what finished since the first. After this point no
   sample can enter the buffer under v, so the recompute covers every buffered sample. (A vLLM
   server paused with /pause would queue the scoring requests, hence abort-and-resume here.)
4. the servers load v+1: pause with abort, reload, set the version, resume.
5. the executor moves to v+1, which purges what became too stale, and resumes.

With `take_next` (train.overlap_reload) the update hands the next step's batch to the trainer
as soon as it is decided and returns; the rest goes on in the background while the trainer
trains on it, and the next update (or `finished()`) waits for it first. The batch is the oldest
groups valid at v+1, which groups entering the buffer later cannot change. It is decided at
step 1 when each of those groups needs no recompute at this update or has its early (or
continuation) scores (the common case: the trainer gets it after the export, and steps 2-5 go
on behind it); else after
step 3, when the buffer is final (steps 4 and 5 behind it); else the update runs to the end.

Keep mode (`keep_requests`, train.update_mode=keep): the servers are never aborted. Step 3
holds finishes instead: rollouts that finish from then until the version change wait and are
accepted at v+1, so the second pass still covers every sample that enters the buffer under v,
without stopping generation. Step 4 pauses with keep: requests in flight freeze with their KV
cache, and after the resume go on under v+1 (their later tokens carry v+1). No segment is
resubmitted and none re-prefilled.

It runs as a coroutine on the executor's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sdp_cli.common.faults import hold_point
from sdp_cli.events.event_log import EventSink
from sdp_cli.events.event_schema import ProximalRecomputeEvent, WeightUpdateEvent
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.recompute import RecomputeStats
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.weight_sync.transport import ExportWeights, WeightTransport

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class UpdateResult:
    version: int
    weights_dir: Path | None
    # Seconds of each step of the sequence, and of the servers' own phases.
    phases: dict[str, float] = field(default_factory=dict)
    server_phases: dict[str, float] = field(default_factory=dict)
    recompute: RecomputeStats | None = None
    # False if some rollout still generated under v when the settle deadline passed.
    settled: bool = True
    total_s: float = 0.0
    # The event loop's clock when the update began.
    started_at: float = 0.0
    # Seconds until the caller could go on: total_s, or less when it took next_batch.
    trainer_wait_s: float = 0.0
    # The next step's batch, taken at the new version before the reload (take_next).
    next_batch: list[RolloutGroup] | None = None
    # The loop's clock when the servers stopped generating for this update (the first abort,
    # or the reload's pause), and the seconds until the executor resumed ("pause per update").
    generation_stopped_at: float | None = None
    generation_pause_s: float = 0.0


class WeightUpdate:
    def __init__(
        self,
        executor: RolloutExecutor,
        servers: WeightTransport,
        export: ExportWeights,
        recompute: bool,
        events: EventSink,
        *,
        settle_timeout_s: float = 60.0,
        abort_every_s: float = 1.0,
        keep_requests: bool = False,
    ) -> None:
        """`recompute`: whether p_t comes from the servers' recompute (steps 2 and 3;
        `RunPlan.proximal_recompute`). `settle_timeout_s` bounds step 3; the servers are asked to
        abort again every `abort_every_s` meanwhile (a request in transit during one abort
        arrives after it). `keep_requests` (train.update_mode=keep): the servers are never
        aborted; requests in flight finish in place across the reload, and step 3 holds what
        finishes instead of aborting (see "keep mode" in the module docstring)."""
        self._executor = executor
        self._servers = servers
        self._export = export
        self._recompute = recompute
        self._events = events
        self._settle_timeout_s = settle_timeout_s
        self._abort_every_s = abort_every_s
        self._keep_requests = keep_requests
        # The reload, version change and resume of an update that returned early.
        self._finishing: asyncio.Future[None] | None = None
        # How long the last reload took: how long a next batch is worth waiting for.
        self._last_reload_s = 0.0

    async def run(
        self, version: int, *, take_next: int = 0, step: int | None = None
    ) -> UpdateResult:
        """Move the servers and the executor from `version` to `version + 1`. With
        `take_next` > 0, return as soon as a batch of that many groups valid at `version + 1`
        is taken (`result.next_batch`, for trainer step `step`), leaving the reload running."""
        await self.finished()
        loop = asyncio.get_running_loop()
        new_version = version + 1
        result = UpdateResult(version=new_version, weights_dir=None, started_at=loop.time())

        def timed(name: str, phase: Awaitable[T]) -> Awaitable[T]:
            return _timed(result, name, phase)

        executor = self._executor
        await timed("pause_s", executor.pause_async())
        export = asyncio.ensure_future(timed("export_s", self._export(new_version)))
        first_pass: asyncio.Future[Any] | None = None
        try:
            if take_next:
                # The oldest groups need nothing more from this update when their early or
                # continuation scores are in (the common case): the trainer can have them
                # before the recompute. While the export runs, and for as long as a reload
                # took, rollouts still running may complete the batch (better than aborting).
                result.next_batch = await timed(
                    "take_next_s",
                    executor.take_ahead_soon_async(
                        take_next, new_version, self._last_reload_s, step=step
                    ),
                )
            if self._recompute:
                first_pass = asyncio.ensure_future(executor.recompute_async(version))
            result.weights_dir = await export
        except BaseException:
            for task in (export, first_pass):
                if task is not None:
                    task.cancel()
            raise
        if result.next_batch is not None:
            self._hand_over(result, self._finish(result, first_pass))
            return result
        await self._score(result, first_pass)
        if take_next and result.settled:
            result.next_batch = await timed(
                "take_next_s", executor.take_ahead_async(take_next, new_version, step=step)
            )
        if result.next_batch is not None:
            self._hand_over(result, self._finish(result))
            return result
        await self._finish(result)
        return result

    def _hand_over(self, result: UpdateResult, rest: Coroutine[Any, Any, None]) -> None:
        """Return to the trainer with `result.next_batch`; `rest` finishes the update."""
        result.trainer_wait_s = asyncio.get_running_loop().time() - result.started_at
        self._finishing = asyncio.ensure_future(rest)

    async def _score(self, result: UpdateResult, first_pass: asyncio.Future[Any] | None) -> None:
        """Steps 2 and 3: the first recompute pass (started with the export), the abort until
        no rollout can finish under v, and the second pass."""
        if first_pass is None:
            return
        executor = self._executor
        try:
            early = await _timed(result, "recompute_s", first_pass)
            if self._keep_requests:
                # Nothing finishes into the buffer under v after this: what finishes until the
                # version change is accepted at v+1, as if it had finished after the reload.
                await _timed(result, "hold_s", executor.hold_finishes_async())
            else:
                result.generation_stopped_at = asyncio.get_running_loop().time()
                result.settled = await _timed(result, "abort_s", self._stop_generation())
            late = await _timed(result, "recompute_s", executor.recompute_async(result.version - 1))
        finally:
            if not first_pass.done():
                first_pass.cancel()
        result.recompute = early.merged(late)
        self._emit_recompute(result.recompute, late, result.settled)

    async def finished(self) -> None:
        """Wait until the servers and the executor are at the version of the last update
        (one that returned early is still reloading); raises what its reload raised."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            await finishing

    async def _finish(
        self, result: UpdateResult, first_pass: asyncio.Future[Any] | None = None
    ) -> None:
        """Steps 4 and 5: the servers load the new version, then the executor moves to it;
        with `first_pass`, the batch was handed over before the recompute, which comes first."""
        if first_pass is not None:
            await self._score(result, first_pass)
        hold_point("weight_update")
        loop = asyncio.get_running_loop()
        if result.generation_stopped_at is None:
            result.generation_stopped_at = loop.time()
        result.server_phases = await _timed(
            result, "reload_s", self._servers.load_weights(result.weights_dir, result.version)
        )
        await _timed(result, "set_version_s", self._executor.set_version_async(result.version))
        await _timed(result, "resume_s", self._executor.resume_async())
        result.generation_pause_s = loop.time() - result.generation_stopped_at
        self._last_reload_s = result.phases["reload_s"]
        result.total_s = loop.time() - result.started_at
        if result.next_batch is None:
            result.trainer_wait_s = result.total_s
        self._emit_update(result)

    async def _stop_generation(self) -> bool:
        """Abort until no running rollout can finish under the current weights."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settle_timeout_s
        while True:
            await self._servers.abort_generation()
            left = deadline - loop.time()
            if await self._executor.settle_async(min(self._abort_every_s, max(left, 0.0))):
                return True
            if loop.time() >= deadline:
                log.warning(
                    "rollouts kept generating %.0f s after the servers aborted them; samples "
                    "they finish may miss the proximal recompute",
                    self._settle_timeout_s,
                )
                return False

    def _emit_recompute(self, stats: RecomputeStats, late: RecomputeStats, settled: bool) -> None:
        self._events.emit(
            ProximalRecomputeEvent(
                **stats.as_dict(),
                # Of `samples`, those that finished while the update was under way.
                late_samples=late.samples,
                settled=settled,
            )
        )

    def _emit_update(self, result: UpdateResult) -> None:
        self._events.emit(
            WeightUpdateEvent(
                version=result.version,
                phases=result.phases,
                server_phases=result.server_phases,
                weights_dir=None if result.weights_dir is None else str(result.weights_dir),
                total_s=result.total_s,
                trainer_wait_s=result.trainer_wait_s,
                generation_pause_s=result.generation_pause_s,
                update_mode="keep" if self._keep_requests else "abort",
            )
        )


async def _timed(result: UpdateResult, name: str, phase: Awaitable[T]) -> T:
    """Await `phase`, adding its seconds to `result.phases[name]`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        return await phase
    finally:
        result.phases[name] = result.phases.get(name, 0.0) + loop.time() - started
