"""Which data positions a run trained, read from its log alone, across kills and resumes.

A resumed run continues from a checkpoint after step s: the steps ≥ s that an earlier session
logged were lost with it (the weights went back to the checkpoint), so they do not count as
trained. Each `run_started` with `resumed_from_step = s` therefore forgets those steps. What is
left is the training history the final weights come from; in it every data position should
appear once, and every position below the last `run_finished`'s `next_position` should be either
trained or listed in its `untrained_positions` (in flight or buffered when the run ended).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    Event,
    RunFinishedEvent,
    RunStartedEvent,
    TrainStepEvent,
)


@dataclass
class PositionAudit:
    trained: int = 0
    # Positions that appear in more than one kept step (or twice in one).
    trained_twice: list[int] = field(default_factory=list)
    # Positions below next_position neither trained nor untrained at the end; None when the
    # log has no run_finished to say where the stream ended.
    never_trained: list[int] | None = None
    # Trained rollouts (kept steps or not) whose head lag exceeded max_staleness.
    over_bound: int = 0
    sessions: int = 0
    finished: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "trained": self.trained,
            "trained_twice": self.trained_twice,
            "never_trained": self.never_trained,
            "over_bound": self.over_bound,
            "sessions": self.sessions,
            "finished": self.finished,
        }


def audit_positions(events: Iterable[Event]) -> PositionAudit:
    audit = PositionAudit()
    kept: dict[int, list[int]] = {}
    max_staleness: int | None = None
    finished: RunFinishedEvent | None = None
    for event in events:
        if isinstance(event, RunStartedEvent):
            audit.sessions += 1
            max_staleness = event.max_staleness
            kept = {step: p for step, p in kept.items() if step < event.resumed_from_step}
            finished = None
        elif isinstance(event, TrainStepEvent):
            kept[event.step] = [int(p) for p in event.positions or [] if p is not None]
        elif isinstance(event, BatchTakenEvent) and max_staleness is not None:
            audit.over_bound += sum(1 for lag in event.head_lags if lag > max_staleness)
        elif isinstance(event, RunFinishedEvent):
            finished = event
    counts = Counter(p for positions in kept.values() for p in positions)
    audit.trained = sum(counts.values())
    audit.trained_twice = sorted(p for p, n in counts.items() if n > 1)
    if finished is not None and finished.next_position is not None:
        audit.finished = True
        accounted = set(counts) | set(finished.untrained_positions or [])
        audit.never_trained = [p for p in range(finished.next_position) if p not in accounted]
    return audit
