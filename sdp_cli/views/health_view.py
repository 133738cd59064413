"""Run-level off-policy health from the `train_step` events' `health` and `health_by_lag`
fields (per-step figures made by sdp_cli/trainer/health.py), and the healthy ranges the
warnings of `sdp inspect-staleness` use (docs/design.md, Off-policy health).

Across steps, means and fractions are weighted by each step's trained tokens (so the run's
figure is the one over all its tokens, as if one step); maxima and minima are the run's
extremes; behav_weight_p99 is the worst step's p99 (a quantile does not merge from summaries);
adv_std is the token-weighted mean of the steps' standard deviations; the uninformative-group
fraction is the mean over steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rich import box
from rich.table import Table

from sdp_cli.events.event_schema import HEALTH_KEYS

# Healthy ranges: above these a warning names the keys to change.
MASKED_FRACTION_LIMIT = 0.2  # cap_fraction + floor_fraction
MISMATCH_KL_LIMIT = 0.05  # nats per token, k3 estimate of KL(behaviour ‖ proximal)
CLIP_FRACTION_LIMIT = 0.3

_MAX_KEYS = frozenset({"behav_weight_max", "behav_weight_p99", "adv_max"})
_MIN_KEYS = frozenset({"adv_min"})
_PER_STEP_KEYS = frozenset({"uninformative_group_fraction"})
# Columns of the by-lag table (text and dashboard): the advantage's spread stays in the JSON.
TABLE_KEYS = tuple(k for k in HEALTH_KEYS if k not in ("adv_std", "adv_min", "adv_max"))


@dataclass
class HealthTally:
    """The health records of many steps, folded into one."""

    steps: int = 0
    tokens: float = 0.0
    weighted: dict[str, float] = field(default_factory=dict)
    extremes: dict[str, float] = field(default_factory=dict)
    per_step: dict[str, float] = field(default_factory=dict)

    def add(self, record: Mapping[str, float]) -> None:
        self.steps += 1
        tokens = float(record.get("tokens", 0.0))
        self.tokens += tokens
        for key, value in record.items():
            if key == "tokens":
                continue
            if key in _MAX_KEYS:
                self.extremes[key] = max(self.extremes.get(key, value), value)
            elif key in _MIN_KEYS:
                self.extremes[key] = min(self.extremes.get(key, value), value)
            elif key in _PER_STEP_KEYS:
                self.per_step[key] = self.per_step.get(key, 0.0) + value
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * tokens

    def summary(self) -> dict[str, float]:
        if self.steps == 0:
            return {}
        out = {"tokens": self.tokens, "steps": float(self.steps)}
        out.update({k: v / self.tokens if self.tokens else 0.0 for k, v in self.weighted.items()})
        out.update(self.extremes)
        out.update({k: v / self.steps for k, v in self.per_step.items()})
        return out


@dataclass
class RunHealth:
    run: HealthTally = field(default_factory=HealthTally)
    by_lag: dict[str, HealthTally] = field(default_factory=dict)
    # The last step's own figures, for the live view.
    last: dict[str, float] = field(default_factory=dict)
    last_by_lag: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, step: Mapping[str, float], by_lag: Mapping[str, Mapping[str, float]]) -> None:
        if not step:
            return
        self.run.add(step)
        for lag, record in by_lag.items():
            self.by_lag.setdefault(lag, HealthTally()).add(record)
        self.last = dict(step)
        self.last_by_lag = {lag: dict(record) for lag, record in by_lag.items()}

    def summary(self) -> dict[str, float]:
        return self.run.summary()

    def summary_by_lag(self) -> dict[str, dict[str, float]]:
        ordered = sorted(self.by_lag.items(), key=lambda item: int(item[0]))
        return {lag: tally.summary() for lag, tally in ordered}

    def copy(self) -> RunHealth:
        def tally_copy(t: HealthTally) -> HealthTally:
            return HealthTally(
                t.steps, t.tokens, dict(t.weighted), dict(t.extremes), dict(t.per_step)
            )

        return RunHealth(
            tally_copy(self.run),
            {lag: tally_copy(t) for lag, t in self.by_lag.items()},
            dict(self.last),
            {lag: dict(r) for lag, r in self.last_by_lag.items()},
        )


# Short column headers of the by-lag table.
_HEADERS = {
    "tokens": "tok",
    "mismatch_kl": "KL",
    "clip_fraction": "clip",
    "clip_low_fraction": "low",
    "clip_high_fraction": "high",
    "cap_fraction": "cap",
    "floor_fraction": "floor",
    "behav_weight_p99": "w p99",
    "behav_weight_max": "w max",
    "adv_mean": "adv",
    "adv_zero_fraction": "A=0",
}
_FRACTIONS = frozenset(k for k in TABLE_KEYS if k.endswith("_fraction"))


def _health_cell(key: str, row: Mapping[str, float]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "tokens":
        return f"{value:.0f}"
    if key in _FRACTIONS:
        return f"{value:.1%}"
    if key == "adv_mean":
        return f"{value:.2f}"
    if key == "mismatch_kl":
        return f"{value:.3f}"
    return f"{value:.3g}"


def health_table(
    run: Mapping[str, float], by_lag: Mapping[str, Mapping[str, float]], title: str
) -> Table:
    """One row per version lag and one for all, with the uninformative-group fraction in the
    caption: the by-lag table of inspect-staleness and the dashboard's health panel."""
    # Narrow cells (one space between columns) so that a dozen columns fit 80 characters.
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1)
    )
    table.add_column("lag", justify="right")
    for key in TABLE_KEYS:
        table.add_column(_HEADERS[key], justify="right")
    for lag, row in by_lag.items():
        table.add_row(lag, *(_health_cell(key, row) for key in TABLE_KEYS))
    if run:
        table.add_row("all", *(_health_cell(key, run) for key in TABLE_KEYS), style="bold")
        uninformative = run.get("uninformative_group_fraction")
        if uninformative is not None:
            table.caption = (
                f"KL: mismatch KL(behaviour ‖ proximal), w: behaviour weight, A: advantage; "
                f"uninformative groups (all rewards equal): {uninformative:.1%}"
            )
            table.caption_justify = "left"
    return table
