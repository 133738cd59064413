"""The staleness manager: admission capacity and the counters that conserve rollouts
(docs/design.md, Admission and capacity).

Every rollout id moves through exactly one path:

    admit ─► running ─┬─► accepted (buffered) ─┬─► consumed   (given to the trainer)
                      │                        ├─► drained    (handed back at shutdown)
                      │                        └─► dropped    (stale in the buffer: slot back)
                      ├─► dropped at finish     (stale or uninformative: slot back)
                      └─► rejected              (no usable group: None, error, cancelled)

`accepted_live` counts accepted rollouts minus those dropped from the buffer; consumed and
drained ones stay in it, which is how the staleness limit (η + v + 1)·B advances by B per version.
So at every instant

    submitted = running + accepted_live + rejected + dropped

The manager tracks which ids are running or buffered, so a second drop, finish or consume of
the same id raises instead of silently giving a slot back twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from sdp_cli.rollout.capacity import CapacityTerms, capacity_terms


class LedgerError(RuntimeError):
    """A rollout id took a transition its state does not allow (a bug in the caller)."""


class StalenessManager:
    """Thread-safe admission control and rollout accounting for one executor."""

    def __init__(self, *, max_staleness: int, batch_size: int, max_concurrent: int) -> None:
        if max_staleness < 0 or batch_size < 1 or max_concurrent < 1:
            raise ValueError("need max_staleness >= 0, batch_size >= 1, max_concurrent >= 1")
        self.max_staleness = max_staleness
        self.batch_size = batch_size
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._version = 0
        self._submitted = 0
        self._accepted_live = 0
        self._accepted_total = 0
        self._consumed = 0
        self._drained = 0
        self._rejected: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._running_ids: set[int] = set()
        self._buffered_ids: set[int] = set()

    # ---- capacity -------------------------------------------------------------------------

    def _terms_locked(self) -> CapacityTerms:
        return capacity_terms(
            version=self._version,
            max_staleness=self.max_staleness,
            batch_size=self.batch_size,
            max_concurrent=self.max_concurrent,
            running=len(self._running_ids),
            accepted_live=self._accepted_live,
        )

    def terms(self) -> CapacityTerms:
        with self._lock:
            return self._terms_locked()

    def capacity(self) -> int:
        return self.terms().capacity

    @property
    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        with self._lock:
            if version < self._version:
                raise ValueError(f"version may not go back ({self._version} → {version})")
            self._version = version

    # ---- transitions ----------------------------------------------------------------------

    def try_admit(self) -> int | None:
        """Take one slot if capacity allows; returns the new rollout id, or None when full.
        Check and increment happen under one lock so two callers cannot both take the last
        slot."""
        with self._lock:
            if self._terms_locked().capacity <= 0:
                return None
            rollout_id = self._submitted
            self._submitted += 1
            self._running_ids.add(rollout_id)
            return rollout_id

    def accept(self, rollout_id: int) -> None:
        with self._lock:
            self._leave_running(rollout_id, "accept")
            self._buffered_ids.add(rollout_id)
            self._accepted_live += 1
            self._accepted_total += 1

    def reject(self, rollout_id: int, reason: str) -> None:
        """The workflow produced no usable group (returned None, raised, was cancelled)."""
        with self._lock:
            self._leave_running(rollout_id, "reject")
            self._rejected[str(reason)] += 1

    def drop_at_finish(self, rollout_id: int, reason: str) -> None:
        """Stale when it finished, before entering the buffer. It was never counted in
        accepted_live, so leaving `running` is the one slot it gives back."""
        with self._lock:
            self._leave_running(rollout_id, "drop at finish")
            self._dropped[str(reason)] += 1

    def drop_buffered(self, rollout_ids: Iterable[int], reason: str) -> None:
        """Stale in the buffer: each gives back its accepted_live slot once."""
        with self._lock:
            count = self._leave_buffer(rollout_ids, "drop")
            self._accepted_live -= count
            self._dropped[str(reason)] += count

    def consume(self, rollout_ids: Iterable[int]) -> None:
        """Handed to the trainer. Stays in accepted_live: that is what moves the bound by B
        per version instead of letting the buffer refill without limit."""
        with self._lock:
            self._consumed += self._leave_buffer(rollout_ids, "consume")

    def drain(self, rollout_ids: Iterable[int]) -> None:
        """Handed back to the caller at shutdown; like consumed, stays in accepted_live."""
        with self._lock:
            self._drained += self._leave_buffer(rollout_ids, "drain")

    def restore(self, version: int) -> None:
        """Resume from a checkpoint at `version`: as if v·B rollouts had been submitted,
        accepted and consumed, so the bound holds from the first step."""
        if version < 0:
            raise ValueError(f"version must be >= 0 (got {version})")
        with self._lock:
            if self._running_ids or self._buffered_ids:
                raise LedgerError(
                    f"restore needs an idle executor ({len(self._running_ids)} running, "
                    f"{len(self._buffered_ids)} buffered)"
                )
            done = version * self.batch_size
            self._version = version
            self._submitted = self._accepted_live = self._accepted_total = done
            self._consumed = done
            self._drained = 0
            self._rejected.clear()
            self._dropped.clear()

    def _leave_running(self, rollout_id: int, what: str) -> None:
        try:
            self._running_ids.remove(rollout_id)
        except KeyError:
            raise LedgerError(f"{what}: rollout {rollout_id} is not running") from None

    def _leave_buffer(self, rollout_ids: Iterable[int], what: str) -> int:
        """Remove ids from the buffered set, all or none (set operations: the purge can drop
        tens of thousands at once)."""
        given = rollout_ids if isinstance(rollout_ids, list) else list(rollout_ids)
        leaving = set(given)
        if len(leaving) != len(given) or not leaving <= self._buffered_ids:
            missing = sorted(leaving - self._buffered_ids)[:5]
            raise LedgerError(
                f"{what}: rollouts {missing or 'given twice'} are not buffered (or repeated)"
            )
        self._buffered_ids -= leaving
        return len(leaving)

    # ---- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """All counters and capacity terms from one consistent moment."""
        with self._lock:
            terms = self._terms_locked()
            return {
                **terms.as_dict(),
                "max_staleness": self.max_staleness,
                "batch_size": self.batch_size,
                "submitted": self._submitted,
                "accepted_total": self._accepted_total,
                "rejected": sum(self._rejected.values()),
                "rejected_by_reason": dict(self._rejected),
                "dropped_total": sum(self._dropped.values()),
                "dropped": dict(self._dropped),
                "consumed": self._consumed,
                "drained": self._drained,
                "buffered": len(self._buffered_ids),
            }

    def is_running(self, rollout_id: int) -> bool:
        with self._lock:
            return rollout_id in self._running_ids


def conservation_holds(snapshot: dict[str, Any]) -> bool:
    """submitted = running + accepted_live + rejected + dropped (docs/design.md, Admission
    and capacity)."""
    return snapshot["submitted"] == (
        snapshot["running"]
        + snapshot["accepted_live"]
        + snapshot["rejected"]
        + snapshot["dropped_total"]
    )
