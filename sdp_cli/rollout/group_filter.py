"""Dynamic sampling (`rollout.filter_groups=same_reward`): a group whose rewards are all equal
has every GRPO advantage 0 and teaches nothing, so it is not trained (docs/design.md,
Dynamic sampling).

A filtered group leaves the ledger as a drop at finish with reason `uninformative`: its slot
comes back once and the executor generates another group in its place. When every group is
uninformative that would go on forever, so the filter watches the share of uninformative groups
among the last `uninformative_window` finished ones: at or above `max_uninformative_fraction` it
warns once; still there one whole window later, with not one informative group in the window, it
asks the run to stop. A share just under 1 only slows the batches down (a run near the top of a
task trains its last informative groups that way), so it never stops a run.
"""

from __future__ import annotations

from collections import deque

from sdp_cli.config.rollout_settings import FilterGroups
from sdp_cli.rollout.trajectory import RolloutGroup


def is_informative(group: RolloutGroup) -> bool:
    """False when every reward of the group is the same (every advantage would be 0)."""
    rewards = group.rewards
    return any(r != rewards[0] for r in rewards[1:])


class GroupFilter:
    """Decides per finished group and keeps the window that bounds how long the run may go on
    finding nothing to train."""

    def __init__(self, max_fraction: float, window: int) -> None:
        if not 0 < max_fraction <= 1 or window < 1:
            raise ValueError("need 0 < max_fraction <= 1 and window >= 1")
        self.max_fraction = max_fraction
        self.window = window
        self._recent: deque[bool] = deque(maxlen=window)
        self._uninformative_in_window = 0
        self._seen = 0
        # Groups seen when the share first reached the limit; None while below it.
        self._over_since: int | None = None
        # Set once each; the executor logs/emits the warning and fails the run on the stop.
        self.warning: str | None = None
        self.stop: str | None = None

    @classmethod
    def of(cls, mode: FilterGroups, max_fraction: float, window: int) -> GroupFilter | None:
        return None if mode == FilterGroups.none else cls(max_fraction, window)

    def fraction(self) -> float:
        return self._uninformative_in_window / len(self._recent) if self._recent else 0.0

    def observe(self, group: RolloutGroup) -> bool:
        """True if `group` is to be trained; updates the window, `warning` and `stop`."""
        informative = is_informative(group)
        if len(self._recent) == self.window and self._recent[0]:
            self._uninformative_in_window -= 1
        self._recent.append(not informative)
        self._uninformative_in_window += not informative
        self._seen += 1
        if len(self._recent) < self.window:
            return informative
        fraction = self.fraction()
        if fraction < self.max_fraction:
            self._over_since = None
        elif self._over_since is None:
            self._over_since = self._seen
            if self.warning is None:
                self.warning = self._message(fraction, "generation goes on for now")
        elif self.stop is None and fraction == 1.0 and self._seen - self._over_since >= self.window:
            self.stop = self._message(fraction, "the run stops: no group left to train")
        return informative

    def _message(self, fraction: float, outcome: str) -> str:
        return (
            f"{fraction:.0%} of the last {self.window} groups had all rewards equal and were "
            f"not trained (rollout.max_uninformative_fraction={self.max_fraction:g}); "
            f"{outcome}. Use a larger rollout.n_samples, an easier task, or "
            "rollout.filter_groups=none (a longer rollout.uninformative_window waits longer)"
        )
