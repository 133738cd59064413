"""The off-policy health figures on their way from the trainer to the `train_step` event:
`train_step` returns them among its flat stats under `health/` (the step) and
`health/lag<k>/` (by version lag, sdp_cli/trainer/health.py); the loop, which imports no torch,
moves them into the event's typed `health` and `health_by_lag` fields."""

from __future__ import annotations

from collections.abc import Mapping

STATS_PREFIX = "health/"
# The step's record only: the share of groups whose rewards are all equal.
UNINFORMATIVE_KEY = "uninformative_group_fraction"


def split_health(
    stats: Mapping[str, float],
) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """`train_step` stats → (the others, the step's health, health by lag keyed by str(lag))."""
    rest: dict[str, float] = {}
    step: dict[str, float] = {}
    by_lag: dict[str, dict[str, float]] = {}
    for name, value in stats.items():
        if not name.startswith(STATS_PREFIX):
            rest[name] = value
            continue
        key = name[len(STATS_PREFIX) :]
        if key.startswith("lag") and "/" in key:
            lag, _, sub = key[3:].partition("/")
            by_lag.setdefault(lag, {})[sub] = value
        else:
            step[key] = value
    return rest, step, dict(sorted(by_lag.items(), key=lambda item: int(item[0])))
