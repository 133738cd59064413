"""Tolerant readers for values the event schema does not type: live executor snapshots shown by
the dashboard, and lag keys of JSON objects (strings in the log). They never raise: a value that
does not fit reads as None (or is left out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def as_int(value: Any) -> int | None:
    # bool is an int subclass, but a flag where a count belongs is a writer bug, not a count.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def as_lag_counts(value: Any) -> dict[int, int]:
    """{"0": 12, "1": 3} (JSON object keys are strings) → {0: 12, 1: 3}."""
    if not isinstance(value, Mapping):
        return {}
    counts: dict[int, int] = {}
    for key, count in value.items():
        lag = _lag_key(key)
        n = as_int(count)
        if lag is not None and n is not None:
            counts[lag] = counts.get(lag, 0) + n
    return counts


def _lag_key(key: Any) -> int | None:
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return None
    return as_int(key)
