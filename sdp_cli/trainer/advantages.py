"""GRPO advantages: each completion's reward relative to the other completions of its prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Rewards closer than this are one value; dividing their float noise by eps would invent signal.
_EQUAL_TOLERANCE = 1e-12


def group_advantages(
    rewards: Sequence[float], eps: float, divide_by_std: bool = True
) -> list[float]:
    """(reward − group mean) / (group std + eps), with the population std of the group; without
    `divide_by_std` (Dr.GRPO, train.adv_norm=none) only reward − group mean, so a group with
    little spread is not scaled up to the weight of one with much.

    A group whose rewards are all equal carries no preference between its completions, so its
    advantages are exactly zero.
    """
    if not rewards:
        return []
    if max(rewards) - min(rewards) <= _EQUAL_TOLERANCE:
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    if not divide_by_std:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + eps) for r in rewards]
