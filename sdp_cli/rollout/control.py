"""The synchronous core of the executor: manager + strategy + output buffer + events.

Everything here is plain method calls with no awaiting, so the asyncio executor stays a thin
shell around it and property tests can drive any interleaving of submit / finish / version
change / take deterministically. The executor calls it only from its event-loop thread;
`snapshot()` is safe from any thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from sdp_cli.events.event_log import EventSink, NullEventLog, keeps_events
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    CapacityEvent,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    SampleDroppedEvent,
    UninformativeWarningEvent,
)
from sdp_cli.rollout.group_filter import GroupFilter
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.staleness import StalenessManager
from sdp_cli.rollout.strategy import (
    Buffered,
    Dropped,
    DropPoint,
    DropReason,
    StalenessStrategy,
)
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory

# (dropped group, reason, point, version): told of every drop, on the executor loop.
DropListener = Callable[[RolloutGroup, str, str, int], None]

log = logging.getLogger(__name__)


class RejectReason(StrEnum):
    """Why a rollout produced no usable group (counted as rejected, not dropped)."""

    no_group = "no_group"  # the workflow returned None or no samples
    error = "error"  # the workflow raised
    poison = "poison"  # servers died serving one of its requests (inference/poison.py)
    environment = "environment"  # an episode's environment or agent raised or timed out
    cancelled = "cancelled"  # still in flight at shutdown


class StalenessControl:
    def __init__(
        self,
        manager: StalenessManager,
        strategy: StalenessStrategy,
        events: EventSink | None = None,
        defer_free: bool = False,
        positions: DataPositions | None = None,
        group_filter: GroupFilter | None = None,
    ) -> None:
        self.manager = manager
        # Dynamic sampling (rollout.filter_groups); None trains every group.
        self.group_filter = group_filter
        self._warned_uninformative = False
        # Data positions follow the ledger: a rollout that ends without being trained gives
        # its position back for replay (rollout/positions.py).
        self.positions = positions
        self.strategy = strategy
        self.events: EventSink = events if events is not None else NullEventLog()
        self._keeps_events = keeps_events(self.events)
        self._buffer: deque[Buffered] = deque()
        # The version each running rollout was submitted at.
        self._submit_version: dict[int, int] = {}
        # Groups the last take() dropped (the executor wakes admission when > 0).
        self.last_take_dropped = 0
        # With defer_free, groups dropped from the buffer are kept here until
        # release_dropped(): freeing tens of thousands of groups at once costs more than the
        # purge itself, so the executor frees them in small chunks between other callbacks.
        self._defer_free = defer_free
        self._unreleased: list[list[Dropped]] = []
        # Called with (group, reason, point, version) for every dropped group (samples.jsonl).
        self.drop_listener: DropListener | None = None

    @property
    def version(self) -> int:
        return self.manager.version

    @property
    def buffer_size(self) -> int:
        return len(self._buffer)

    def buffered(self) -> list[Buffered]:
        return list(self._buffer)

    # ---- admission ------------------------------------------------------------------------

    def admit(self) -> int | None:
        """A new rollout id if capacity allows, else None. (Pausing is the executor's job.)"""
        rollout_id = self.manager.try_admit()
        if rollout_id is not None:
            version = self.manager.version
            self._submit_version[rollout_id] = version
            # The position is assigned even when no event is kept: the workflow reads it.
            position = None if self.positions is None else self.positions.assign(rollout_id)
            if self._keeps_events:
                self.events.emit(
                    RolloutSubmittedEvent(rollout_id=rollout_id, version=version, position=position)
                )
        return rollout_id

    # ---- finish ---------------------------------------------------------------------------

    def finish(
        self,
        rollout_id: int,
        group: RolloutGroup | None,
        error: str | None = None,
        reason: RejectReason | None = None,
    ) -> bool:
        """Record a finished rollout; True if it entered the buffer. A rollout without a group
        is rejected with `reason` (default: error if there is one, else no_group)."""
        submit_version = self._submit_version.pop(rollout_id, self.version)
        if group is None or not group.samples:
            reason = reason or (RejectReason.error if error else RejectReason.no_group)
            self.manager.reject(rollout_id, reason)
            self._give_back([rollout_id])
            self._emit_finished(rollout_id, None, accepted=False, reason=reason, error=error)
            return False
        group.rollout_id = rollout_id
        group.submit_version = submit_version
        item = Buffered.of(group)
        drop = self.strategy.drop_reason(item, self.version)
        if drop is not None:
            self.manager.drop_at_finish(rollout_id, drop)
            self._give_back([rollout_id])
            self._emit_finished(rollout_id, item, accepted=False, reason=drop)
            self._emit_drops([(item, drop)], DropPoint.finish)
            return False
        if self.group_filter is not None and not self._observe_informative(item):
            # Like a drop at finish (docs/design.md, Dynamic sampling): the slot comes back
            # once. The position counts as used, not replayed: the same prompt would most
            # likely give an all-equal group again.
            self.manager.drop_at_finish(rollout_id, DropReason.uninformative)
            if self.positions is not None:
                self.positions.trained([rollout_id])
            self._emit_finished(rollout_id, item, accepted=False, reason=DropReason.uninformative)
            self._emit_drops([(item, DropReason.uninformative)], DropPoint.finish)
            return False
        self.manager.accept(rollout_id)
        self._buffer.append(item)
        self._emit_finished(rollout_id, item, accepted=True, reason=None)
        return True

    def _observe_informative(self, item: Buffered) -> bool:
        """Run the group filter on a finished group; warn (log and event) the first time the
        share of uninformative groups reaches the limit."""
        assert self.group_filter is not None
        informative = self.group_filter.observe(item.group)
        warning = self.group_filter.warning
        if warning is not None and not self._warned_uninformative:
            self._warned_uninformative = True
            log.warning("%s", warning)
            self.events.emit(
                UninformativeWarningEvent(
                    version=self.version,
                    fraction=self.group_filter.fraction(),
                    window=self.group_filter.window,
                    max_fraction=self.group_filter.max_fraction,
                    message=warning,
                )
            )
        return informative

    def cancel(self, rollout_id: int) -> None:
        """An in-flight rollout cancelled at shutdown: it produced no group."""
        self._submit_version.pop(rollout_id, None)
        self.manager.reject(rollout_id, RejectReason.cancelled)
        self._give_back([rollout_id])
        self._emit_finished(rollout_id, None, accepted=False, reason=RejectReason.cancelled)

    # ---- version change -------------------------------------------------------------------

    def set_version(self, version: int) -> int:
        """Move to `version` and purge the whole buffer; returns how many were dropped."""
        self.manager.set_version(version)
        if self.strategy.never_drops or not self._buffer:
            return 0
        kept, dropped = self.strategy.partition(self._buffer, version)
        if dropped:
            self._buffer = deque(kept)
            self._record_buffer_drops(dropped, DropPoint.purge)
        return len(dropped)

    def refresh_recompute_versions(self, items: list[Buffered]) -> None:
        for item in items:
            item.refresh_recompute_version()

    # ---- take -----------------------------------------------------------------------------

    def take(
        self, batch_size: int, wait_s: float = 0.0, step: int | None = None
    ) -> list[RolloutGroup] | None:
        """The oldest `batch_size` groups that pass the strategy at the current version, or
        None if fewer are buffered (the valid ones stay at the front, in order). `step` is the
        trainer step the batch is for (logged with it)."""
        self.last_take_dropped = 0
        buffer = self._buffer
        if len(buffer) < batch_size:
            return None
        version = self.version
        taken, dropped = self.strategy.partition(buffer, version, keep_at_most=batch_size)
        # The scanned prefix leaves the buffer; if the batch is not complete, the valid groups
        # go back to the front in order.
        if len(taken) + len(dropped) == len(buffer):
            buffer.clear()
        else:
            for _ in range(len(taken) + len(dropped)):
                buffer.popleft()
        if len(taken) < batch_size:
            buffer.extendleft(reversed(taken))
        if dropped:
            self.last_take_dropped = len(dropped)
            self._record_buffer_drops(dropped, DropPoint.take)
        if len(taken) < batch_size:
            return None
        return self._hand_over(taken, version, wait_s, step)

    def take_ahead(
        self,
        batch_size: int,
        version: int,
        step: int | None = None,
        pending: Callable[[Buffered], bool] | None = None,
    ) -> list[RolloutGroup] | None:
        """During the move to `version`, before the executor gets there: the oldest
        `batch_size` groups that will be valid at `version`, or None, with the buffer untouched,
        if fewer are. The same batch a take after the version change would give, since its purge
        keeps exactly the groups valid at `version`; nothing is dropped here, the purge does
        that. Groups that enter the buffer later are newer, so they cannot change which those
        are. `pending(item)` is True for a group whose validity still waits on the update (its
        proximal recompute): one before the batch is complete means None."""
        self.last_take_dropped = 0
        taken: list[Buffered] = []
        for item in self._buffer:
            if len(taken) == batch_size:
                break
            if pending is not None and pending(item):
                return None
            if self.strategy.drop_reason(item, version) is None:
                taken.append(item)
        if len(taken) < batch_size:
            return None
        leaving = {id(item) for item in taken}
        self._buffer = deque(item for item in self._buffer if id(item) not in leaving)
        return self._hand_over(taken, version, 0.0, step)

    def _hand_over(
        self, taken: list[Buffered], version: int, wait_s: float, step: int | None
    ) -> list[RolloutGroup]:
        """Give `taken` (already out of the buffer) to the trainer, training at `version`."""
        groups = [item.group for item in taken]
        rollout_ids = [group.rollout_id for group in groups]
        self.manager.consume(rollout_ids)
        if self.positions is not None:
            self.positions.trained(rollout_ids)
        self._emit_batch_taken(taken, rollout_ids, version, wait_s, step)
        return groups

    def drain(self) -> list[RolloutGroup]:
        """Hand back every buffered group (shutdown), in order."""
        items = list(self._buffer)
        self._buffer.clear()
        rollout_ids = [item.group.rollout_id for item in items]
        self.manager.drain(rollout_ids)
        self._give_back(rollout_ids)
        return [item.group for item in items]

    def restore(self, version: int) -> None:
        """Resume at `version`; the manager refuses unless nothing is running or buffered."""
        self.manager.restore(version)

    # ---- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.manager.snapshot(),
            "strategy": self.strategy.name,
            "queue_size": len(self._buffer),
        }

    def capacity_event(self) -> CapacityEvent:
        """The `capacity` event: every term of the formula and the counters."""
        snap = self.manager.snapshot()
        return CapacityEvent(
            version=snap["version"],
            max_concurrent=snap["max_concurrent"],
            running=snap["running"],
            accepted_live=snap["accepted_live"],
            staleness_limit=snap["staleness_limit"],
            concurrency_room=snap["concurrency_room"],
            staleness_room=snap["staleness_room"],
            capacity=snap["capacity"],
            submitted=snap["submitted"],
            rejected=snap["rejected"],
            dropped_total=snap["dropped_total"],
            consumed=snap["consumed"],
            queue_size=len(self._buffer),
        )

    # ---- events ---------------------------------------------------------------------------

    def _record_buffer_drops(self, dropped: list[Dropped], point: DropPoint) -> None:
        by_reason: dict[str, list[int]] = {}
        for item, reason in dropped:
            by_reason.setdefault(reason, []).append(item.group.rollout_id)
        for reason, ids in by_reason.items():
            self.manager.drop_buffered(ids, reason)
            self._give_back(ids)
        self._emit_drops(dropped, point)
        if self._defer_free:
            self._unreleased.append(dropped)

    def _give_back(self, rollout_ids: list[int]) -> None:
        if self.positions is not None:
            self.positions.give_back(rollout_ids)

    def release_dropped(self, at_most: int = 2000) -> bool:
        """Free up to `at_most` dropped groups kept by defer_free; True if more remain."""
        while at_most > 0 and self._unreleased:
            batch = self._unreleased[-1]
            count = min(at_most, len(batch))
            del batch[-count:]
            at_most -= count
            if not batch:
                self._unreleased.pop()
        return bool(self._unreleased)

    def _emit_drops(self, dropped: list[Dropped], point: DropPoint) -> None:
        # One event per drop; the loop is kept lean because a purge may drop thousands.
        version = self.version
        point_text = str(point)
        listener = self.drop_listener
        if listener is not None:
            for item, reason in dropped:
                listener(item.group, str(reason), point_text, version)
        if not self._keeps_events:
            return
        emit = self.events.emit
        for item, reason in dropped:
            head, tail = item.head, item.tail
            emit(
                SampleDroppedEvent(
                    rollout_id=item.group.rollout_id,
                    reason=str(reason),
                    point=point_text,
                    head_lag=0 if head is None else version - head,
                    tail_lag=0 if tail is None else version - tail,
                    version=version,
                    head_version=head,
                    tail_version=tail,
                )
            )

    def _emit_finished(
        self,
        rollout_id: int,
        item: Buffered | None,
        *,
        accepted: bool,
        reason: str | None,
        error: str | None = None,
    ) -> None:
        if not self._keeps_events:
            return
        version = self.version
        reason_text = None if reason is None else str(reason)
        if item is None:
            event = RolloutFinishedEvent(
                rollout_id=rollout_id,
                version=version,
                accepted=accepted,
                reason=reason_text,
                error=error,
            )
        else:
            samples = item.group.samples
            event = RolloutFinishedEvent(
                rollout_id=rollout_id,
                version=version,
                accepted=accepted,
                reason=reason_text,
                head_version=item.head,
                tail_version=item.tail,
                head_lag=item.head_lag(version),
                tail_lag=item.tail_lag(version),
                n_tokens=item.n_tokens,
                # Segments of the most interrupted completion in the group.
                n_segments=max(s.n_segments for s in samples),
                reward=sum(s.reward for s in samples) / len(samples),
                error=error,
                **completion_timings(samples),
                **episode_figures(samples),
            )
        self.events.emit(event)

    def _emit_batch_taken(
        self,
        taken: list[Buffered],
        rollout_ids: list[int],
        version: int,
        wait_s: float,
        step: int | None,
    ) -> None:
        by_version: dict[int, int] = {}
        for item in taken:
            for token_version, count in item.version_counts.items():
                by_version[token_version] = by_version.get(token_version, 0) + count
        tokens_by_lag = {str(version - v): n for v, n in sorted(by_version.items(), reverse=True)}
        self.events.emit(
            BatchTakenEvent(
                step=step,
                version=version,
                rollout_ids=rollout_ids,
                head_lags=[0 if i.head is None else version - i.head for i in taken],
                tail_lags=[0 if i.tail is None else version - i.tail for i in taken],
                tokens_by_lag=tokens_by_lag,
                wait_s=wait_s,
            )
        )


def episode_figures(samples: list[Trajectory]) -> dict[str, Any]:
    """The `episode_*` fields of a finished event, for a group of episodes."""
    if not samples or any(s.turns is None for s in samples):
        return {}
    return {
        "episode_turns": [sum(1 for t in s.turns or [] if t["trained"]) for s in samples],
        "episode_generate_s": [round(s.generate_s or 0.0, 6) for s in samples],
        "episode_env_s": [round(s.env_s or 0.0, 6) for s in samples],
        "episode_end": [s.end_reason for s in samples],
        "episode_tool_calls": [
            sum(1 for t in s.turns or [] if t["role"] == "tool") for s in samples
        ],
    }


def completion_timings(samples: list[Trajectory]) -> dict[str, Any]:
    """`completion_s`, `completion_tokens` and `prompt_tokens` of a finished event, when every
    sample was timed; not for episodes, whose time includes the environment's (what
    `sdp simulate --calibrate` fits is one request's latency)."""
    times = [s.generate_s for s in samples]
    if not samples or any(t is None for t in times) or any(s.turns is not None for s in samples):
        return {}
    return {
        "completion_s": times,
        "completion_tokens": [len(s.output_ids) for s in samples],
        "prompt_tokens": [len(s.prompt_ids) for s in samples],
    }
