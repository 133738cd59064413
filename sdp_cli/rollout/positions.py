"""Data positions: which prompt of the task's stream each rollout works on, so that every
position is trained exactly once, across drops, failures and resumes.

A new rollout takes the lowest position that was handed out before but gave no trained sample
(its rollout was dropped as stale, was rejected, was cancelled at shutdown), and otherwise the
next unused position. A position leaves the books only when the trainer takes its group. The
state a checkpoint keeps is the next unused position plus every position not trained yet (in
flight, buffered or waiting to be replayed); a resumed run replays those first, so a kill at any
moment loses no prompt and trains none twice.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PositionState:
    """What a checkpoint stores: positions below `next_position` are trained, except
    `untrained`."""

    next_position: int = 0
    untrained: list[int] = field(default_factory=list)


class DataPositions:
    """Thread-safe: the executor assigns and settles positions on its loop; the trainer reads
    `state()` for a checkpoint from its own thread."""

    def __init__(self, start: PositionState | None = None) -> None:
        start = start or PositionState()
        if any(p < 0 or p >= start.next_position for p in start.untrained):
            raise ValueError("untrained positions must lie below next_position")
        self._lock = threading.Lock()
        self._next = start.next_position
        self._replay = sorted(set(start.untrained))
        heapq.heapify(self._replay)
        self._of_rollout: dict[int, int] = {}

    def assign(self, rollout_id: int) -> int:
        """The position rollout `rollout_id` generates for."""
        with self._lock:
            if rollout_id in self._of_rollout:
                raise ValueError(f"rollout {rollout_id} already has a position")
            if self._replay:
                position = heapq.heappop(self._replay)
            else:
                position = self._next
                self._next += 1
            self._of_rollout[rollout_id] = position
            return position

    def position(self, rollout_id: int) -> int:
        with self._lock:
            return self._of_rollout[rollout_id]

    def give_back(self, rollout_ids: Iterable[int]) -> None:
        """These rollouts will give no trained sample: their positions are generated again."""
        with self._lock:
            for rollout_id in rollout_ids:
                position = self._of_rollout.pop(rollout_id, None)
                if position is not None:
                    heapq.heappush(self._replay, position)

    def trained(self, rollout_ids: Iterable[int]) -> None:
        """The trainer took these rollouts: their positions are done."""
        with self._lock:
            for rollout_id in rollout_ids:
                del self._of_rollout[rollout_id]

    def state(self) -> PositionState:
        with self._lock:
            untrained = sorted([*self._replay, *self._of_rollout.values()])
            return PositionState(self._next, untrained)
