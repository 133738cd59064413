"""Staleness strategies: which finished rollouts may still be trained on (docs/design.md,
Strategies).

`standard` admits by capacity only and never drops. `segment_wise` drops a group when

- `head_lag > η` (its oldest token is more than η versions old), or
- in `prox_mode=segment`, no token was ever recomputed and `tail_lag > 1` (every behaviour
  weight would be 1, so the decoupled correction would do nothing).

The same check runs at three points: when a rollout finishes, over the whole buffer when the
version changes, and on the groups the trainer takes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import ClassVar

from sdp_cli.config.rollout_settings import Strategy
from sdp_cli.config.run_plan import needs_proximal_recompute
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.rollout.trajectory import NOT_RECOMPUTED, RolloutGroup


class DropReason(StrEnum):
    head_lag = "head_lag"
    no_recompute = "no_recompute"
    # Dynamic sampling: all rewards of the group equal (rollout/group_filter.py); at finish only.
    uninformative = "uninformative"


# Plain strings in the hot paths: enum attribute access costs more than the check itself when
# a purge drops tens of thousands of groups.
HEAD_LAG: str = DropReason.head_lag.value
NO_RECOMPUTE: str = DropReason.no_recompute.value


class DropPoint(StrEnum):
    finish = "finish"
    purge = "purge"
    take = "take"


@dataclass(slots=True)
class Buffered:
    """A finished group with its token versions summarised once: versions never change after
    finish, and neither the purge over a large buffer nor the batch_taken event should rescan
    every token."""

    group: RolloutGroup
    head: int | None
    tail: int | None
    recompute_version: int
    # Model tokens per version over the whole group.
    version_counts: dict[int, int]

    @classmethod
    def of(cls, group: RolloutGroup) -> Buffered:
        counts: Counter[int] = Counter()
        for sample in group.samples:
            counts.update(sample.model_versions())
        head = min(counts) if counts else None
        tail = max(counts) if counts else None
        return cls(group, head, tail, group.recompute_version, dict(counts))

    @property
    def rollout_id(self) -> int:
        return self.group.rollout_id

    def refresh_recompute_version(self) -> None:
        self.recompute_version = self.group.recompute_version

    def head_lag(self, version: int) -> int:
        return 0 if self.head is None else version - self.head

    def tail_lag(self, version: int) -> int:
        return 0 if self.tail is None else version - self.tail

    @property
    def n_tokens(self) -> int:
        return sum(self.version_counts.values())


# (group, DropReason value)
Dropped = tuple[Buffered, str]


class StalenessStrategy:
    """Base: never drops. Subclasses override `drop_reason` and `partition`."""

    name: ClassVar[str] = "standard"
    never_drops: ClassVar[bool] = True

    def drop_reason(self, item: Buffered, version: int) -> str | None:
        return None

    def partition(
        self, items: Iterable[Buffered], version: int, keep_at_most: int | None = None
    ) -> tuple[list[Buffered], list[Dropped]]:
        """Split into (kept, dropped), both in their original order. With `keep_at_most`, stop
        as soon as that many are kept (the take filter only scans as far as it needs); the
        items scanned are then the first len(kept) + len(dropped)."""
        return list(islice(items, keep_at_most)), []


class StandardStrategy(StalenessStrategy):
    """AReaL's behaviour: lag beyond η is reported in the events, not prevented."""


class SegmentWiseStrategy(StalenessStrategy):
    name: ClassVar[str] = "segment_wise"
    never_drops: ClassVar[bool] = False

    def __init__(self, max_staleness: int, prox_mode: ProxMode) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (got {max_staleness})")
        self.max_staleness = max_staleness
        self.needs_recompute = needs_proximal_recompute(prox_mode)

    def drop_reason(self, item: Buffered, version: int) -> str | None:
        if item.head is None:
            return None
        if version - item.head > self.max_staleness:
            return HEAD_LAG
        if (
            self.needs_recompute
            and item.recompute_version == NOT_RECOMPUTED
            and version - item.tail > 1  # type: ignore[operator]
        ):
            return NO_RECOMPUTE
        return None

    def partition(
        self, items: Iterable[Buffered], version: int, keep_at_most: int | None = None
    ) -> tuple[list[Buffered], list[Dropped]]:
        # Thresholds on cached versions instead of per-item lag arithmetic: this runs over the
        # whole buffer at every version change.
        oldest_head = version - self.max_staleness
        oldest_unrecomputed_tail = version - 1
        check_recompute = self.needs_recompute
        limit = -1 if keep_at_most is None else keep_at_most
        kept: list[Buffered] = []
        dropped: list[Dropped] = []
        for item in items:
            if len(kept) == limit:
                break
            head = item.head
            if head is None:
                kept.append(item)
            elif head < oldest_head:
                dropped.append((item, HEAD_LAG))
            elif (
                check_recompute
                and item.tail < oldest_unrecomputed_tail  # type: ignore[operator]
                and item.recompute_version == NOT_RECOMPUTED
            ):
                dropped.append((item, NO_RECOMPUTE))
            else:
                kept.append(item)
        return kept, dropped


def make_strategy(
    strategy: Strategy | str, max_staleness: int, prox_mode: ProxMode | str
) -> StalenessStrategy:
    if Strategy(strategy) == Strategy.standard:
        return StandardStrategy()
    return SegmentWiseStrategy(max_staleness, ProxMode(prox_mode))
