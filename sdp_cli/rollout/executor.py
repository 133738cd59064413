"""The rollout executor (docs/design.md, Executor): an asyncio loop in its own thread that
submits rollouts while capacity allows, applies the staleness strategy and serves batches to
the trainer.

The trainer's thread uses the blocking methods (`take`, `pause`, `set_version`, ...); each one
runs its `*_async` twin on the executor loop and waits for it, so all state is touched by one
thread. A coroutine already running on the loop (the simulated trainer) may await the `*_async`
methods directly. Nothing here blocks the loop: the only lock shared with other threads is the
manager's, held for a few counter updates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from sdp_cli.common.loop_thread import LoopFactory, LoopThread, LoopThreadError
from sdp_cli.config.rollout_settings import RecomputeOn, RolloutConfig
from sdp_cli.config.run_plan import needs_proximal_recompute
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.errors import EpisodeRejected, SdpError
from sdp_cli.events.event_log import EventSink, NullEventLog, keeps_events
from sdp_cli.events.event_schema import CapacityEvent
from sdp_cli.inference.client_errors import PoisonRequestError
from sdp_cli.inference.types import Gate
from sdp_cli.rollout.control import DropListener, RejectReason, StalenessControl
from sdp_cli.rollout.group_filter import GroupFilter
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.recompute import (
    Job,
    ProximalRecomputer,
    RecomputeStats,
    Scorer,
    count_missing_recompute,
)
from sdp_cli.rollout.staleness import StalenessManager
from sdp_cli.rollout.strategy import Buffered, make_strategy
from sdp_cli.rollout.trajectory import RolloutGroup

log = logging.getLogger(__name__)
T = TypeVar("T")


class Workflow(Protocol):
    async def run(
        self, rollout_id: int, executor_version: int, gate: Gate
    ) -> RolloutGroup | None: ...


class ExecutorError(SdpError):
    """The executor cannot do what was asked (not started, failed, no scorer)."""


class ExecutorStopped(ExecutorError):
    """The executor was stopped while the call waited."""


class TakeTimeout(ExecutorError):
    """`take` waited `timeout` seconds without a full batch."""


class RolloutExecutor:
    def __init__(
        self,
        workflow: Workflow,
        rollout: RolloutConfig,
        prox_mode: ProxMode = ProxMode.segment,
        *,
        events: EventSink | None = None,
        scorer: Scorer | None = None,
        loop_factory: LoopFactory | None = None,
        capacity_interval_s: float = 0.5,
        max_consecutive_errors: int = 100,
        positions: DataPositions | None = None,
    ) -> None:
        self._workflow = workflow
        self._batch_size = rollout.batch_size
        self._take_timeout_s = rollout.take_timeout_s
        self._events: EventSink = events if events is not None else NullEventLog()
        self._keeps_events = keeps_events(self._events)
        self._recomputer = (
            ProximalRecomputer(scorer, rollout.recompute_batch_size, rollout.recompute_concurrency)
            if scorer
            else None
        )
        self._needs_recompute = needs_proximal_recompute(prox_mode)
        # Segment mode scores buffered samples while the trainer trains (recompute.py).
        self._score_early = (
            self._recomputer is not None
            and self._needs_recompute
            and rollout.recompute_early
            and rollout.recompute_on == RecomputeOn.server
        )
        # Samples that needed the recompute at a version change and did not get it (a bug in
        # the weight-update protocol if ever > 0; the simulator reports it).
        self._recompute_missed = 0
        # Completions of each running rollout waiting at the closed gate.
        self._parked: dict[int, int] = {}
        # Calls from other threads running on the loop; a stop cancels them.
        self._calls: set[asyncio.Task[Any]] = set()
        self._took_at_version: int | None = None
        self._recompute_active = False
        self._runner = LoopThread("sdp-rollout-executor", loop_factory)
        self._capacity_interval_s = capacity_interval_s
        self._max_consecutive_errors = max_consecutive_errors
        self._consecutive_errors = 0
        self._episode_errors_seen: set[str] = set()
        manager = StalenessManager(
            max_staleness=rollout.max_staleness,
            batch_size=rollout.batch_size,
            max_concurrent=rollout.max_concurrent,
        )
        strategy = make_strategy(rollout.strategy, rollout.max_staleness, prox_mode)
        self._control = StalenessControl(
            manager,
            strategy,
            self._events,
            defer_free=True,
            positions=positions,
            group_filter=GroupFilter.of(
                rollout.filter_groups,
                rollout.max_uninformative_fraction,
                rollout.uninformative_window,
            ),
        )
        self._releasing = False

        # Set on the loop thread when it starts (`_on_loop_start`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False
        self._stopping = False
        self._stopped = False
        self._failure: BaseException | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._submitter: asyncio.Task[None] | None = None
        self._pending_takes: list[int] = []
        # Created on the loop thread in _on_loop_start.
        self._gate_open: asyncio.Event
        self._wake: asyncio.Event
        self._buffer_grew: asyncio.Event
        self._buffer_lock: asyncio.Lock
        self._early_wake: asyncio.Event
        self._early_idle: asyncio.Event
        self._early_scorer: asyncio.Task[None] | None = None
        self._rollouts_changed: asyncio.Event
        self._capacity_handle: asyncio.TimerHandle | None = None
        self._capacity_last_at = float("-inf")
        self._capacity_last: CapacityEvent | None = None

    # ---- lifecycle (any thread) -----------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Start the loop thread; with `paused=True` nothing is submitted until `resume()`."""
        if self._runner.started:
            raise ExecutorError("the executor was already started")
        self._paused = paused
        try:
            self._runner.start(self._on_loop_start)
        except LoopThreadError as exc:
            raise ExecutorError(str(exc)) from None

    def stop(self, timeout: float = 60.0) -> list[RolloutGroup]:
        """Cancel in-flight rollouts, stop the loop and return the accepted groups the trainer
        has not taken (in order). Idempotent: a second call returns []."""
        if not self._runner.started or self._stopped:
            return self._control.drain() if not self._stopped else []
        if self._runner.in_loop_thread():
            raise ExecutorError("stop() was called from the executor's own loop")
        leftovers = self._runner.submit(self._shutdown()).result(timeout)
        self._runner.stop(timeout)
        self._stopped = True
        return leftovers

    def __enter__(self) -> RolloutExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- trainer API (blocking, from any thread but the loop's) ---------------------------

    def take(
        self,
        batch_size: int | None = None,
        timeout: float | None = None,
        *,
        step: int | None = None,
    ) -> list[RolloutGroup]:
        """Block until `batch_size` (default B) groups pass the strategy; raise TakeTimeout
        after `timeout` seconds (default rollout.take_timeout_s). `step`, the trainer step the
        batch is for, is logged with the `batch_taken` event."""
        return self._call(self.take_async(batch_size, timeout, step=step))

    def pause(self) -> None:
        self._call(self.pause_async())

    def resume(self) -> None:
        self._call(self.resume_async())

    def set_version(self, version: int) -> int:
        """Move to `version` and purge the buffer; returns how many groups were dropped."""
        return self._call(self.set_version_async(version))

    def recompute_proximal(self, version: int) -> RecomputeStats:
        return self._call(self.recompute_async(version))

    def drain(self) -> list[RolloutGroup]:
        """Remove and return every buffered group."""
        if not self._runner.started:
            return self._control.drain()
        if self._stopped:
            return []
        return self._call(self.drain_async())

    def restore(self, version: int) -> None:
        """Resume at `version` with accepted_live = v·B. Call before `start()`, or while
        paused with nothing in flight."""
        if not self._runner.started:
            self._control.restore(version)
            return
        self._call(self.restore_async(version))

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the executor loop and wait for its result (the trainer's weight-update
        protocol uses this). On timeout the coroutine is cancelled and TimeoutError raised."""
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"coroutine did not finish within {timeout} s") from None
        except concurrent.futures.CancelledError:
            raise ExecutorStopped("the executor stopped before the call finished") from None

    def watch_drops(self, listener: DropListener) -> None:
        """Call `listener(group, reason, point, version)` for every group dropped as stale, on the
        executor loop (keep it quick)."""
        self._control.drop_listener = listener

    def snapshot(self) -> dict[str, Any]:
        """Counters, capacity terms, queue size, version, paused. Cheap; any thread."""
        return {
            **self._control.snapshot(),
            "recompute_missed": self._recompute_missed,
            "paused": self._paused,
            "running_tasks": len(self._tasks),
            "stopped": self._stopped,
        }

    @property
    def version(self) -> int:
        return self._control.version

    @property
    def paused(self) -> bool:
        return self._paused

    # ---- the same operations as coroutines on the loop ------------------------------------

    async def take_async(
        self,
        batch_size: int | None = None,
        timeout: float | None = None,
        *,
        step: int | None = None,
    ) -> list[RolloutGroup]:
        wanted = self._batch_size if batch_size is None else batch_size
        if wanted < 1:
            raise ValueError(f"batch_size must be >= 1 (got {wanted})")
        limit = self._take_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + limit
        self._pending_takes.append(wanted)
        try:
            while True:
                self._raise_if_unusable()
                async with self._buffer_lock:
                    batch = self._control.take(wanted, wait_s=loop.time() - started, step=step)
                if self._control.last_take_dropped:
                    # Dropped groups gave their slots back.
                    self._release_dropped_soon()
                    self._wake.set()
                    self._capacity_changed()
                if batch is not None:
                    self._capacity_changed()
                    self._took_at_version = self._control.version
                    self._wake_early_scoring()
                    return batch
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TakeTimeout(self._timeout_message(wanted, limit))
                self._buffer_grew.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._buffer_grew.wait(), remaining)
        finally:
            self._pending_takes.remove(wanted)

    async def take_ahead_async(
        self, batch_size: int, version: int, *, step: int | None = None
    ) -> list[RolloutGroup] | None:
        """During the weight update to `version`, once its recompute is done: the next batch,
        taken now at `version` if the buffer already holds `batch_size` groups valid there,
        else None (nothing taken or dropped)."""
        batch, _ = await self._take_ahead(batch_size, version, step, before_recompute=False)
        return batch

    async def take_ahead_soon_async(
        self, batch_size: int, version: int, wait_s: float, *, step: int | None = None
    ) -> list[RolloutGroup] | None:
        """take_ahead_async before the update's recompute, tried again as running rollouts
        finish into the buffer (paused, the executor starts none), for up to `wait_s` seconds,
        and no longer once a group waits on the recompute or nothing is running. A group that
        needs the recompute and lacks early or continuation scores for it leaves the batch
        undecided; the scores of the groups looked at are written, as the recompute would."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        self._pending_takes.append(batch_size)
        try:
            while True:
                self._buffer_grew.clear()
                batch, scores_missing = await self._take_ahead(
                    batch_size, version, step, before_recompute=True
                )
                left = deadline - loop.time()
                running = self._control.manager.terms().running
                if batch is not None or scores_missing or left <= 0 or running == 0:
                    return batch
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._buffer_grew.wait(), left)
        finally:
            self._pending_takes.remove(batch_size)

    async def _take_ahead(
        self, batch_size: int, version: int, step: int | None, before_recompute: bool
    ) -> tuple[list[RolloutGroup] | None, bool]:
        """The batch (or None), and whether a group lacking its scores was what stopped it."""
        pending = None
        scores_missing = False
        if before_recompute and self._recomputer is not None and self._needs_recompute:
            recomputer, scored_at = self._recomputer, version - 1

            def pending(item: Buffered) -> bool:
                nonlocal scores_missing
                if not recomputer.write_early(item.group, scored_at):
                    scores_missing = True
                    return True
                item.refresh_recompute_version()
                return False

        async with self._buffer_lock:
            batch = self._control.take_ahead(batch_size, version, step=step, pending=pending)
        if batch is not None:
            self._capacity_changed()
            # As after a take at `version`: early scoring starts once the executor is there.
            self._took_at_version = version
        return batch, scores_missing

    async def pause_async(self) -> None:
        self._paused = True
        self._gate_open.clear()

    async def resume_async(self) -> None:
        self._paused = False
        self._finish_open.set()
        self._gate_open.set()
        self._wake.set()
        self._wake_early_scoring()

    async def hold_finishes_async(self) -> None:
        """Until the next version change (or resume), rollouts that finish wait before they
        enter the buffer, and are then accepted at the new version. With
        train.update_mode=keep the servers are not aborted before the reload, so this is what
        closes the buffer for the update's last recompute pass (docs/design.md, Weight-update
        protocol)."""
        self._finish_open.clear()

    @property
    def accepts_at_version(self) -> int:
        """The version at which a group finishing now is accepted: the next one while
        finishes are held."""
        held = self._loop is not None and not self._finish_open.is_set()
        return self._control.version + 1 if held else self._control.version

    async def set_version_async(self, version: int) -> int:
        async with self._buffer_lock:
            if self._needs_recompute and version == self._control.version + 1:
                groups = (item.group for item in self._control.buffered())
                self._recompute_missed += count_missing_recompute(groups, self._control.version)
            dropped = self._control.set_version(version)
        # Held finishes go on now, in later loop steps, so at the new version.
        self._finish_open.set()
        if dropped:
            self._release_dropped_soon()
        self._wake.set()
        self._capacity_changed()
        return dropped

    async def recompute_async(self, version: int) -> RecomputeStats:
        if self._recomputer is None:
            raise ExecutorError(
                "proximal recompute needs a scorer: pass scorer= to RolloutExecutor"
            )
        self._recompute_active = True
        try:
            # An early scoring call in flight was sent under the weights the servers still
            # hold; its answers count, so wait for it rather than cancel it.
            await self._early_idle.wait()
            # Holding the buffer lock keeps take and purge from handing out or dropping a
            # group whose logprobs are half rewritten.
            async with self._buffer_lock:
                items = self._control.buffered()
                groups = [item.group for item in items]
                stats = await self._recomputer.recompute(groups, version)
                self._control.refresh_recompute_versions(items)
        finally:
            self._recompute_active = False
        return stats

    async def settle_async(self, timeout: float) -> bool:
        """Wait until no running rollout can finish before the gate opens again: each has a
        completion waiting at the closed gate (a group finishes only when all its completions
        have) or has ended. Call while paused, after the servers aborted what they were
        generating. False if `timeout` seconds passed first."""
        if not self._paused:
            raise ExecutorError("settle needs a paused executor")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._all_rollouts_parked():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._rollouts_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rollouts_changed.wait(), remaining)
        return True

    def _all_rollouts_parked(self) -> bool:
        return all(rollout_id in self._parked for rollout_id in self._tasks)

    async def drain_async(self) -> list[RolloutGroup]:
        async with self._buffer_lock:
            groups = self._control.drain()
        self._capacity_changed()
        return groups

    async def restore_async(self, version: int) -> None:
        self._control.restore(version)
        self._wake.set()
        self._capacity_changed()

    # ---- loop internals -------------------------------------------------------------------

    def _on_loop_start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop thread, before the loop runs: the loop's own objects and first tasks."""
        self._loop = loop
        self._gate_open = asyncio.Event()
        if not self._paused:
            self._gate_open.set()
        self._wake = asyncio.Event()
        self._buffer_grew = asyncio.Event()
        self._buffer_lock = asyncio.Lock()
        self._early_wake = asyncio.Event()
        self._early_idle = asyncio.Event()
        self._early_idle.set()
        self._rollouts_changed = asyncio.Event()
        self._finish_open = asyncio.Event()
        self._finish_open.set()
        self._submitter = loop.create_task(self._submit_loop())
        if self._score_early:
            self._early_scorer = loop.create_task(self._early_scoring_loop())

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _gate_for(self, rollout_id: int) -> Gate:
        return lambda: self._gate(rollout_id)

    async def _gate(self, rollout_id: int) -> None:
        """Awaited before every segment; while it waits, the rollout counts as parked."""
        if self._gate_open.is_set():
            return
        self._parked[rollout_id] = self._parked.get(rollout_id, 0) + 1
        self._rollouts_changed.set()
        try:
            await self._gate_open.wait()
        finally:
            left = self._parked[rollout_id] - 1
            if left:
                self._parked[rollout_id] = left
            else:
                del self._parked[rollout_id]

    async def _submit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        control = self._control
        while True:
            admitted = False
            while not self._paused and self._failure is None:
                try:
                    rollout_id = control.admit()
                except Exception as exc:
                    self._fail(exc)
                    break
                if rollout_id is None:
                    break
                admitted = True
                self._tasks[rollout_id] = loop.create_task(
                    self._run_rollout(rollout_id, control.version)
                )
            if admitted:
                self._capacity_changed()
            self._wake.clear()
            await self._wake.wait()

    async def _run_rollout(self, rollout_id: int, version: int) -> None:
        group: RolloutGroup | None = None
        error: str | None = None
        reason: RejectReason | None = None
        try:
            group = await self._workflow.run(rollout_id, version, self._gate_for(rollout_id))
            if not self._finish_open.is_set():
                await self._finish_open.wait()
        except asyncio.CancelledError:
            self._tasks.pop(rollout_id, None)
            self._record(lambda: self._control.cancel(rollout_id))
            self._rollouts_changed.set()
            raise
        except PoisonRequestError as exc:
            # Counted and left behind: the run goes on without it.
            error, reason = f"{type(exc).__name__}: {exc}", RejectReason.poison
            log.warning("rollout %d rejected: %s", rollout_id, error)
        except EpisodeRejected as exc:
            # The environment's fault, not the run's: counted, each kind logged once.
            error, reason = f"{exc.kind}: {exc}", RejectReason.environment
            if exc.kind not in self._episode_errors_seen:
                self._episode_errors_seen.add(exc.kind)
                log.warning("rollout %d rejected (shown once per kind): %s", rollout_id, error)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._note_workflow_error(rollout_id, error)
        else:
            self._consecutive_errors = 0
        self._tasks.pop(rollout_id, None)
        accepted = self._record(lambda: self._control.finish(rollout_id, group, error, reason))
        group_filter = self._control.group_filter
        if group_filter is not None and group_filter.stop is not None:
            # Bounds the trainer's wait when almost nothing is informative: its take raises
            # this message instead of waiting out rollout.take_timeout_s batch after batch.
            self._fail(ExecutorError(group_filter.stop))
        self._rollouts_changed.set()
        if accepted:
            self._wake_early_scoring()
        if (
            accepted
            and self._pending_takes
            and self._control.buffer_size >= min(self._pending_takes)
        ):
            self._buffer_grew.set()
        self._wake.set()
        self._capacity_changed()

    def _note_workflow_error(self, rollout_id: int, error: str) -> None:
        """A failing rollout frees its slot at once, so a workflow that always raises would
        resubmit in a tight loop; after enough failures in a row the executor gives up."""
        self._consecutive_errors += 1
        if self._consecutive_errors == 1:
            log.warning("rollout %d failed: %s", rollout_id, error)
        if self._consecutive_errors >= self._max_consecutive_errors:
            self._fail(
                ExecutorError(
                    f"the workflow failed {self._consecutive_errors} times in a row; "
                    f"last error: {error}"
                )
            )

    def _record(self, action: Callable[[], T]) -> T | None:
        try:
            return action()
        except Exception as exc:
            self._fail(exc)
            return None

    def _fail(self, exc: BaseException) -> None:
        """Stop admitting and make every take() raise: an accounting error is a bug, and a
        workflow that keeps failing will not recover by retrying."""
        if self._failure is None:
            log.error("rollout executor failed: %r", exc)
            self._failure = exc
        self._buffer_grew.set()

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise ExecutorError(f"the rollout executor failed: {self._failure}")
        if self._stopping:
            raise ExecutorStopped("the rollout executor was stopped")

    async def _shutdown(self) -> list[RolloutGroup]:
        self._stopping = True
        in_flight = dict(self._tasks)
        # Calls in progress go first: a recompute stuck on a server holds the buffer lock.
        tasks = [*self._calls, *in_flight.values()]
        if self._submitter is not None:
            tasks.append(self._submitter)
        if self._early_scorer is not None:
            tasks.append(self._early_scorer)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A task cancelled before its first step never ran its own handler.
        for rollout_id in in_flight:
            if self._control.manager.is_running(rollout_id):
                self._record(lambda rid=rollout_id: self._control.cancel(rid))
        self._tasks.clear()
        # Wake any take() so it raises ExecutorStopped instead of waiting for its timeout.
        self._buffer_grew.set()
        async with self._buffer_lock:
            leftovers = self._control.drain()
        if self._capacity_handle is not None:
            self._capacity_handle.cancel()
            self._capacity_handle = None
        self._emit_capacity()
        return leftovers

    async def proximal_jobs_async(self, version: int) -> list[Job]:
        """The buffered samples the update from `version` will recompute and that have no
        score yet, for a scorer outside the executor (rollout.recompute_on=trainer)."""
        if self._recomputer is None or not self._needs_recompute:
            return []
        async with self._buffer_lock:
            if self._control.version != version:
                return []
            groups = [item.group for item in self._control.buffered()]
            return self._recomputer.pending(groups, version)

    async def keep_proximal_async(
        self, jobs: list[Job], scores: list[list[float]], version: int
    ) -> None:
        """Hold scores taken under `version` outside the executor for its update; like the
        early scores, written only into samples still buffered then."""
        if self._recomputer is None or self._control.version != version:
            return
        for (sample, _), sample_scores in zip(jobs, scores, strict=True):
            self._recomputer.keep(sample, sample_scores, version)

    # ---- early proximal scoring --------------------------------------------------------------

    def _wake_early_scoring(self) -> None:
        if self._score_early:
            self._early_wake.set()

    def _early_scoring_allowed(self, version: int) -> bool:
        """Only between this version's take and the start of its update: samples scored
        before the take would mostly be the ones the trainer takes, and once the update has
        begun the servers may move to the next weights."""
        return (
            not self._paused
            and not self._recompute_active
            and self._took_at_version == version == self._control.version
        )

    async def _early_scoring_loop(self) -> None:
        """Score what the next update will need while the trainer trains; whatever finishes
        during one scoring call goes into the next."""
        assert self._recomputer is not None
        while True:
            await self._early_wake.wait()
            self._early_wake.clear()
            version = self._control.version
            if not self._early_scoring_allowed(version):
                continue
            groups = [item.group for item in self._control.buffered()]
            self._early_idle.clear()
            try:
                await self._recomputer.score_early(
                    groups, version, lambda v=version: self._early_scoring_allowed(v)
                )
            except Exception as exc:
                self._fail(exc)
                return
            finally:
                self._early_idle.set()

    def _release_dropped_soon(self) -> None:
        """Free dropped groups a chunk per loop iteration, so a large purge does not hold the
        loop for the whole deallocation."""
        if not self._releasing and self._loop is not None:
            self._releasing = True
            self._loop.call_soon(self._release_dropped_chunk)

    def _release_dropped_chunk(self) -> None:
        if self._control.release_dropped() and self._loop is not None:
            self._loop.call_soon(self._release_dropped_chunk)
        else:
            self._releasing = False

    def _capacity_changed(self) -> None:
        """Emit a `capacity` event now, or once the rate limit allows; at most one pending."""
        if self._capacity_handle is not None or self._loop is None:
            return
        due = self._capacity_last_at + self._capacity_interval_s
        if self._loop.time() >= due:
            self._emit_capacity()
        else:
            self._capacity_handle = self._loop.call_at(due, self._emit_scheduled_capacity)

    def _emit_scheduled_capacity(self) -> None:
        self._capacity_handle = None
        self._emit_capacity()

    def _emit_capacity(self) -> None:
        if not self._keeps_events:
            return
        event = self._control.capacity_event()
        if event == self._capacity_last:
            return
        self._capacity_last = event
        self._capacity_last_at = self._now()
        self._events.emit(event)

    def _timeout_message(self, wanted: int, timeout: float) -> str:
        snap = self.snapshot()
        return (
            f"no batch of {wanted} rollouts within {timeout:g} s at version {snap['version']} "
            f"(paused={snap['paused']}, queue={snap['queue_size']}, capacity={snap['capacity']}, "
            f"submitted={snap['submitted']}, running={snap['running']}, "
            f"accepted_live={snap['accepted_live']}, rejected={snap['rejected']}, "
            f"dropped={snap['dropped']}, consumed={snap['consumed']})"
        )

    # ---- calling the loop from other threads ----------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self._runner.started or self._loop is None:
            coro.close()
            raise ExecutorError("the executor is not started: call start() first")
        if self._stopped or self._stopping:
            coro.close()
            raise ExecutorStopped("the rollout executor was stopped")
        if self._runner.in_loop_thread():
            coro.close()
            raise ExecutorError(
                "blocking executor call from the executor's own loop; await the *_async method"
            )
        return self._runner.submit(self._tracked(coro))

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await coro
        finally:
            self._calls.discard(task)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Wait without a deadline: the coroutines called this way bound their own waits."""
        return self._wait(self._submit(coro))

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ExecutorStopped("the rollout executor stopped before the call finished") from None
