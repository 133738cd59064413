"""GRPO advantages: each completion's reward relative to the other completions of its prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Rewards closer than this are one value; dividing their float noise by eps would invent signal.
_EQUAL_TOLERANCE = 1e-12


def group_advantages(rewards: Sequence[float], eps: float) -> list[float]:
    """(reward − group mean) / (group std + eps), with the population std of the group.

    A group whose rewards are all equal carries no preference between its completions, so its
    advantages are exactly zero.
    """
    if not rewards:
        return []
    if max(rewards) - min(rewards) <= _EQUAL_TOLERANCE:
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + eps) for r in rewards]
