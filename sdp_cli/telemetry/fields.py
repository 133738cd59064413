"""Tolerant readers for event fields.

Logs come from runs of any age and from writers that may be killed mid-run, so a field can be
missing, null or of the wrong type. Readers of the log never raise on such a field: they see None
(or an empty container) and carry on.
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


def as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_int_list(value: Any) -> list[int]:
    if not isinstance(value, list | tuple):
        return []
    return [n for n in (as_int(item) for item in value) if n is not None]


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


def as_float_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): f for k, v in value.items() if (f := as_float(v)) is not None}


def _lag_key(key: Any) -> int | None:
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return None
    return as_int(key)
