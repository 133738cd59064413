"""The admission formula, with every term exposed for the dashboard (docs/design.md, Admission
and capacity).

capacity(v) = min(max_concurrent − running, (η + v + 1)·B − (accepted_live + running))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CapacityTerms:
    version: int
    max_concurrent: int
    running: int
    accepted_live: int
    # (η + v + 1)·B: rollouts that may have been accepted or be in flight at version v.
    staleness_limit: int
    concurrency_room: int
    staleness_room: int

    @property
    def capacity(self) -> int:
        return max(0, min(self.concurrency_room, self.staleness_room))

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "capacity": self.capacity}


def capacity_terms(
    *,
    version: int,
    max_staleness: int,
    batch_size: int,
    max_concurrent: int,
    running: int,
    accepted_live: int,
) -> CapacityTerms:
    limit = (max_staleness + version + 1) * batch_size
    return CapacityTerms(
        version=version,
        max_concurrent=max_concurrent,
        running=running,
        accepted_live=accepted_live,
        staleness_limit=limit,
        concurrency_room=max_concurrent - running,
        staleness_room=limit - (accepted_live + running),
    )


def capacity_plan(
    *, max_staleness: int, batch_size: int, max_concurrent: int, versions: int
) -> list[dict[str, int]]:
    """What may be admitted at each of the first versions if the trainer consumes exactly B per
    step: the upper bound on rollouts accepted so far and the most that may be in flight."""
    plan: list[dict[str, int]] = []
    for version in range(versions):
        consumed = version * batch_size
        limit = (max_staleness + version + 1) * batch_size
        plan.append(
            {
                "version": version,
                "staleness_limit": limit,
                "consumed_before": consumed,
                "max_in_flight": min(max_concurrent, limit - consumed),
                "max_buffered_ahead": limit - consumed,
            }
        )
    return plan
