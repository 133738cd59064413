"""What happened to staleness in a run, computed from its event log alone (no rendering here).

`summarize(events)` is the pure entry point; `staleness_summary(fold)` reads a fold of the events
(`event_fold.RunFold`, the one the dashboard reads too) that `sdp inspect-staleness --follow`
feeds as the log grows, so it does not re-read it.

It reads the typed events of `sdp_cli.events.event_schema`. Counting rules (the fold's):
- a rollout is dropped at most once: `sample_dropped` events are keyed by rollout id, and a
  `rollout_finished` with `accepted: false` and a staleness reason counts as a drop at "finish"
  unless a `sample_dropped` for the same rollout says more;
- any other `accepted: false` finish is a rejection (the workflow refused the sample);
- per-version numbers are attributed to the executor version an event was logged at;
- trained lags come from `batch_taken` (one head/tail lag per consumed rollout group).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sdp_cli.events.event_schema import (
    CAPACITY_TERMS,
    EXECUTOR_COUNTERS,
    CapacityEvent,
    EvalEvent,
    Event,
)
from sdp_cli.events.fields import as_int
from sdp_cli.views.event_fold import DROP_REASONS, CapacityPoint, RunFold, VersionTally
from sdp_cli.views.health_view import (
    CLIP_FRACTION_LIMIT,
    MASKED_FRACTION_LIMIT,
    MISMATCH_KL_LIMIT,
)

# The trainer waiting for samples this share of its busy time means generation cannot keep up.
TIGHT_WAIT_SHARE = 0.3
# Throwing away this share of submitted rollouts wastes generation on samples never trained.
LOOSE_DROP_SHARE = 0.1


@dataclass(frozen=True)
class VersionRow:
    version: int
    submitted: int
    accepted: int
    rejected: int
    dropped_by_reason: dict[str, int]
    consumed: int
    head_lag_mean: float | None
    head_lag_max: int | None
    tail_lag_mean: float | None
    tail_lag_max: int | None
    # The formula's terms as last logged at this version (None if no capacity event).
    capacity: dict[str, int] | None
    peak_running: int | None

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "dropped_by_reason": dict(self.dropped_by_reason),
            "consumed": self.consumed,
            "head_lag_mean": self.head_lag_mean,
            "head_lag_max": self.head_lag_max,
            "tail_lag_mean": self.tail_lag_mean,
            "tail_lag_max": self.tail_lag_max,
            "capacity": dict(self.capacity) if self.capacity is not None else None,
            "peak_running": self.peak_running,
        }


@dataclass(frozen=True)
class TimeSplit:
    """Where the trainer's time went: waiting for a batch, training, updating weights."""

    wait_s: float
    train_s: float
    weight_update_s: float
    wall_s: float | None

    @property
    def busy_s(self) -> float:
        return self.wait_s + self.train_s + self.weight_update_s

    def share(self, seconds: float) -> float | None:
        return seconds / self.busy_s if self.busy_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "wait_s": self.wait_s,
            "train_s": self.train_s,
            "weight_update_s": self.weight_update_s,
            "wall_s": self.wall_s,
            "wait_share": self.share(self.wait_s),
            "train_share": self.share(self.train_s),
            "weight_update_share": self.share(self.weight_update_s),
        }


@dataclass(frozen=True)
class Advice:
    """A warning about the staleness bound, naming the config keys to change."""

    kind: str  # "tight" | "loose" | "bound_exceeded" | "health"
    message: str
    knobs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "knobs": list(self.knobs)}


@dataclass(frozen=True)
class StalenessSummary:
    run: dict[str, Any]
    finished: bool
    steps: int
    planned_steps: int | None
    batches: int
    submitted: int
    accepted: int
    rejected: int
    dropped_by_reason: dict[str, int]
    dropped_by_point: dict[str, int]
    # reason → point → count
    drop_matrix: dict[str, dict[str, int]]
    consumed: int
    lag_histogram: dict[int, int]
    tail_lag_histogram: dict[int, int]
    tokens_by_lag: dict[int, int]
    per_version: list[VersionRow]
    time: TimeSplit
    weight_updates: int
    weight_update_phases: dict[str, float]
    # "Pause per update": seconds the servers generated nothing in each update, summarised
    # (mode, updates, mean_s, max_s, total_s); None in logs without it.
    pause_per_update: dict[str, Any] | None
    # Capacity events with no room left, by the term that was exhausted (both may be).
    capacity_exhausted: dict[str, int]
    last_capacity: dict[str, int] | None
    capacity_series: list[CapacityPoint]
    advice: list[Advice]
    events: int
    known_events: int
    skipped_lines: int = 0
    # Held-out evaluations in order: step, version, accuracy, pass_at_k, k, mean_reward.
    evals: list[dict[str, Any]] = field(default_factory=list)
    # Rejected rollouts by reason (error, poison, no_group, cancelled).
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    # Errors of the last rollouts rejected as poison requests.
    poison_errors: list[str] = field(default_factory=list)
    # Each server restart or give-up in order: server, state, restarts, reason.
    server_incidents: list[dict[str, Any]] = field(default_factory=list)
    # Off-policy health over the run's steps, and by version lag (views/health_view.py).
    health: dict[str, float] = field(default_factory=dict)
    health_by_lag: dict[str, dict[str, float]] = field(default_factory=dict)
    # task.curriculum: each level in force, in order: step, position, level, reason.
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    # Multi-turn runs: episodes, model turns per episode, generation and environment seconds,
    # the environment's share of them and why episodes ended (EpisodeTally.as_dict); {} else.
    episodes: dict[str, Any] = field(default_factory=dict)

    @property
    def poison_requests(self) -> int:
        return self.rejected_by_reason.get("poison", 0)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_by_reason.values())

    @property
    def max_trained_lag(self) -> int | None:
        return max(self.lag_histogram) if self.lag_histogram else None

    @property
    def max_trained_tail_lag(self) -> int | None:
        return max(self.tail_lag_histogram) if self.tail_lag_histogram else None

    @property
    def max_staleness(self) -> int | None:
        return as_int(self.run.get("max_staleness"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: histogram keys become strings, as JSON objects require."""
        return {
            "run": dict(self.run),
            "finished": self.finished,
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "batches": self.batches,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "poison_requests": self.poison_requests,
            "poison_errors": list(self.poison_errors),
            "server_incidents": [dict(row) for row in self.server_incidents],
            "dropped_total": self.dropped_total,
            "dropped_by_reason": dict(self.dropped_by_reason),
            "dropped_by_point": dict(self.dropped_by_point),
            "drops": {r: dict(points) for r, points in self.drop_matrix.items()},
            "consumed": self.consumed,
            "max_trained_lag": self.max_trained_lag,
            "max_trained_tail_lag": self.max_trained_tail_lag,
            "lag_histogram": _string_keys(self.lag_histogram),
            "tail_lag_histogram": _string_keys(self.tail_lag_histogram),
            "tokens_by_lag": _string_keys(self.tokens_by_lag),
            "trained_tokens": sum(self.tokens_by_lag.values()),
            "per_version": [row.to_dict() for row in self.per_version],
            "time": self.time.to_dict(),
            "weight_updates": self.weight_updates,
            "weight_update_phases": dict(self.weight_update_phases),
            "pause_per_update": self.pause_per_update,
            "capacity_exhausted": dict(self.capacity_exhausted),
            "last_capacity": dict(self.last_capacity) if self.last_capacity else None,
            "warnings": [a.to_dict() for a in self.advice],
            "events": self.events,
            "known_events": self.known_events,
            "skipped_lines": self.skipped_lines,
            "evals": [dict(row) for row in self.evals],
            "health": dict(self.health),
            "health_by_lag": {lag: dict(row) for lag, row in self.health_by_lag.items()},
            "curriculum": [dict(row) for row in self.curriculum],
            "episodes": dict(self.episodes),
        }


def summarize(
    events: Iterable[Event], *, skipped_lines: int = 0, unknown_events: int = 0
) -> StalenessSummary:
    fold = RunFold()
    fold.add_all(events)
    return staleness_summary(fold, skipped_lines=skipped_lines, unknown_events=unknown_events)


def staleness_summary(
    fold: RunFold, *, skipped_lines: int = 0, unknown_events: int = 0
) -> StalenessSummary:
    """The staleness numbers of the events folded so far, with advice."""
    drops = fold.drop_by_rollout.values()
    run = fold.run.fields_dict() if fold.run is not None else {}
    wall_s = fold.wall_s
    if wall_s is None and fold.first_ts is not None and fold.last_ts is not None:
        wall_s = fold.last_ts - fold.first_ts
    partial = StalenessSummary(
        run=run,
        finished=fold.finished,
        steps=fold.steps_seen,
        planned_steps=as_int(run.get("steps")),
        batches=fold.batches,
        submitted=fold.submitted,
        accepted=fold.accepted,
        rejected=fold.rejected,
        rejected_by_reason=fold.rejected_by_reason(),
        poison_errors=list(fold.poison_errors),
        server_incidents=[
            {"server": e.server, "state": e.state, "restarts": e.restarts, "reason": e.reason}
            for e in fold.server_incidents
        ],
        dropped_by_reason=_ordered_reasons(Counter(d.reason for d in drops)),
        dropped_by_point=dict(sorted(Counter(d.point for d in drops).items())),
        drop_matrix=_drop_matrix(fold),
        consumed=fold.consumed,
        lag_histogram=dict(sorted(fold.lag_histogram.items())),
        tail_lag_histogram=dict(sorted(fold.tail_lag_histogram.items())),
        tokens_by_lag=dict(sorted(fold.tokens_by_lag.items())),
        per_version=_version_rows(fold),
        time=TimeSplit(fold.wait_s, fold.train_s, fold.update_s, wall_s),
        weight_updates=fold.weight_updates,
        weight_update_phases=dict(fold.phases),
        pause_per_update=pause_per_update(fold),
        capacity_exhausted=dict(sorted(fold.exhausted.items())),
        last_capacity=_last_capacity(fold.capacity),
        capacity_series=_relative_series(fold),
        advice=[],
        events=fold.events + unknown_events,
        known_events=fold.events,
        skipped_lines=skipped_lines,
        evals=[_eval_row(event) for event in fold.evals],
        health=fold.health.summary(),
        health_by_lag=fold.health.summary_by_lag(),
        curriculum=[
            {"step": e.step, "position": e.position, "level": e.level, "reason": e.reason}
            for e in fold.curriculum
        ],
        episodes=fold.episodes.as_dict() if fold.episodes.episodes else {},
    )
    return _with_advice(partial)


def _last_capacity(event: CapacityEvent | None) -> dict[str, int] | None:
    if event is None:
        return None
    fields = event.fields_dict()
    return {
        **{k: fields[k] for k in CAPACITY_TERMS},
        **{k: fields[k] for k in EXECUTOR_COUNTERS},
        "version": event.version,
    }


def _eval_row(event: EvalEvent) -> dict[str, Any]:
    return {
        "step": event.step,
        "version": event.version,
        "accuracy": event.accuracy,
        "pass_at_k": event.pass_at_k,
        "k": event.k,
        "mean_reward": event.mean_reward,
        "n_prompts": event.n_prompts,
    }


def _drop_matrix(fold: RunFold) -> dict[str, dict[str, int]]:
    matrix: dict[str, Counter[str]] = {}
    for drop in fold.drop_by_rollout.values():
        matrix.setdefault(drop.reason, Counter())[drop.point] += 1
    ordered = _ordered_reasons({r: sum(c.values()) for r, c in matrix.items()})
    return {r: dict(sorted(matrix[r].items())) for r in ordered}


def _version_rows(fold: RunFold) -> list[VersionRow]:
    drops_by_version: dict[int | None, Counter[str]] = {}
    for drop in fold.drop_by_rollout.values():
        drops_by_version.setdefault(drop.version, Counter())[drop.reason] += 1
    rejected_by_version = Counter(fold.rejected_by_rollout.values())
    versions = sorted(
        set(fold.versions)
        | {v for v in drops_by_version if v is not None}
        | {v for v in rejected_by_version if v is not None}
    )
    rows = []
    for version in versions:
        tally = fold.versions.get(version, VersionTally())
        rows.append(
            VersionRow(
                version=version,
                submitted=tally.submitted,
                accepted=tally.accepted,
                rejected=rejected_by_version.get(version, 0),
                dropped_by_reason=_ordered_reasons(drops_by_version.get(version, Counter())),
                consumed=tally.consumed,
                head_lag_mean=_mean(tally.head_lags),
                head_lag_max=max(tally.head_lags, default=None),
                tail_lag_mean=_mean(tally.tail_lags),
                tail_lag_max=max(tally.tail_lags, default=None),
                capacity=dict(tally.capacity) if tally.capacity is not None else None,
                peak_running=tally.peak_running,
            )
        )
    return rows


def _relative_series(fold: RunFold) -> list[CapacityPoint]:
    origin = fold.first_ts or 0.0
    return [replace(point, t=point.t - origin) for point in fold.series]


# --- advice -----------------------------------------------------------------------------------


def _with_advice(summary: StalenessSummary) -> StalenessSummary:
    tight = _tight_advice(summary)
    loose = _loose_advice(summary, also_tight=tight is not None)
    advice = [a for a in (tight, loose, _bound_exceeded_advice(summary)) if a is not None]
    return replace(summary, advice=advice + _health_advice(summary))


def _tight_advice(summary: StalenessSummary) -> Advice | None:
    wait_share = summary.time.share(summary.time.wait_s)
    if summary.batches == 0 or wait_share is None or wait_share < TIGHT_WAIT_SHARE:
        return None
    eta, max_concurrent = _knob_values(summary)
    by_concurrency = summary.capacity_exhausted.get("concurrency", 0)
    by_staleness = summary.capacity_exhausted.get("staleness", 0)
    head = (
        f"bound is tight: the trainer waited for samples {wait_share:.0%} of its time "
        f"({summary.time.wait_s:.1f} s of {summary.time.busy_s:.1f} s)"
    )
    if by_staleness > by_concurrency:
        return Advice(
            "tight",
            f"{head}; admission was mostly stopped by the staleness bound "
            f"({by_staleness} times): raise rollout.max_staleness (now {eta}) so more rollouts "
            f"may run ahead of the trainer.",
            ("rollout.max_staleness",),
        )
    if by_concurrency > 0:
        return Advice(
            "tight",
            f"{head}; admission was mostly stopped by the concurrency bound "
            f"({by_concurrency} times): raise rollout.max_concurrent (now {max_concurrent}) or "
            f"server.count; rollout.max_staleness (now {eta}) also limits how far ahead "
            f"generation may run.",
            ("rollout.max_concurrent", "server.count", "rollout.max_staleness"),
        )
    return Advice(
        "tight",
        f"{head}, though admission always had room: generation itself is too slow; "
        f"raise server.count (more inference servers) or rollout.max_concurrent "
        f"(now {max_concurrent}).",
        ("server.count", "rollout.max_concurrent"),
    )


def _loose_advice(summary: StalenessSummary, *, also_tight: bool) -> Advice | None:
    denominator = summary.submitted or (summary.accepted + summary.rejected + summary.dropped_total)
    # Dynamic sampling's uninformative groups are not stale: the bound has nothing to do with
    # them (rollout.filter_groups), so they do not make it look loose.
    stale_by_reason = {
        reason: n for reason, n in summary.dropped_by_reason.items() if reason != "uninformative"
    }
    stale = sum(stale_by_reason.values())
    if not stale or not denominator:
        return None
    share = stale / denominator
    if share < LOOSE_DROP_SHARE:
        return None
    eta, max_concurrent = _knob_values(summary)
    reasons = ", ".join(f"{n} {reason}" for reason, n in stale_by_reason.items())
    head = (
        f"bound is loose: {stale} of {denominator} rollouts "
        f"({share:.0%}) were generated and then dropped as stale ({reasons})"
    )
    mostly_no_recompute = summary.dropped_by_reason.get(
        "no_recompute", 0
    ) > summary.dropped_by_reason.get("head_lag", 0)
    if mostly_no_recompute:
        return Advice(
            "loose",
            f"{head}; most had no proximal recompute and tail lag > 1: use "
            f"train.prox_mode=loglinear or train.prox_mode=recompute, or lower "
            f"rollout.max_concurrent (now {max_concurrent}).",
            ("train.prox_mode", "rollout.max_concurrent"),
        )
    if also_tight:
        # Lowering max_concurrent would starve the trainer further; only η helps both.
        return Advice(
            "loose",
            f"{head}; since the trainer also waits, raise rollout.max_staleness (now {eta}) "
            f"rather than lowering concurrency.",
            ("rollout.max_staleness",),
        )
    return Advice(
        "loose",
        f"{head}: lower rollout.max_concurrent (now {max_concurrent}) so fewer rollouts go "
        f"stale in flight, or raise rollout.max_staleness (now {eta}).",
        ("rollout.max_concurrent", "rollout.max_staleness"),
    )


def _bound_exceeded_advice(summary: StalenessSummary) -> Advice | None:
    eta = summary.max_staleness
    max_lag = summary.max_trained_lag
    if eta is None or max_lag is None or max_lag <= eta:
        return None
    beyond = sum(n for lag, n in summary.lag_histogram.items() if lag > eta)
    strategy = summary.run.get("strategy")
    if strategy == "standard":
        return Advice(
            "bound_exceeded",
            f"{beyond} trained samples had head lag above η={eta} (max {max_lag}): "
            f"rollout.strategy=standard admits by capacity only and never drops; use "
            f"rollout.strategy=segment_wise to enforce the bound.",
            ("rollout.strategy",),
        )
    return Advice(
        "bound_exceeded",
        f"{beyond} trained samples had head lag above η={eta} (max {max_lag}) under "
        f"strategy {strategy}: the executor let stale samples through; this is a bug, "
        f"please report it with this log.",
        (),
    )


def _health_advice(summary: StalenessSummary) -> list[Advice]:
    """Off-policy health outside its healthy range over the run (thresholds in
    views/health_view.py, docs/design.md); the worst lag is named where it stands out."""
    health = summary.health
    if not health:
        return []
    eta, _ = _knob_values(summary)
    worst = _worst_lags(summary.health_by_lag)
    masked = health.get("cap_fraction", 0.0) + health.get("floor_fraction", 0.0)
    kl = health.get("mismatch_kl", 0.0)
    clip = health.get("clip_fraction", 0.0)
    # (out of range, what, the keys to change) per figure.
    checks = [
        (
            masked > MASKED_FRACTION_LIMIT,
            f"{masked:.0%} of the trained tokens had a behaviour weight beyond the cap or floor "
            f"(cap {health.get('cap_fraction', 0.0):.0%}, floor "
            f"{health.get('floor_fraction', 0.0):.0%}; worst lag {worst.get('masked', '?')}), "
            f"above {MASKED_FRACTION_LIMIT:.0%}: widen train.behav_weight_cap / "
            f"train.behav_weight_floor, or lower rollout.max_staleness (now {eta}).",
            ("train.behav_weight_cap", "train.behav_weight_floor", "rollout.max_staleness"),
        ),
        (
            kl > MISMATCH_KL_LIMIT,
            f"mismatch KL behaviour → proximal is {kl:.3g} nats per token (worst lag "
            f"{worst.get('mismatch_kl', '?')}), above {MISMATCH_KL_LIMIT}: the samples are too "
            f"far off-policy; lower rollout.max_staleness (now {eta}).",
            ("rollout.max_staleness",),
        ),
        (
            clip > CLIP_FRACTION_LIMIT,
            f"the PPO clip bound {clip:.0%} of the trained tokens (low "
            f"{health.get('clip_low_fraction', 0.0):.0%}, high "
            f"{health.get('clip_high_fraction', 0.0):.0%}), above {CLIP_FRACTION_LIMIT:.0%}: "
            f"each step moves the policy too far; lower train.lr or widen train.eps_clip_low / "
            f"train.eps_clip_high.",
            ("train.lr", "train.eps_clip_low", "train.eps_clip_high"),
        ),
    ]
    return [Advice("health", message, knobs) for bad, message, knobs in checks if bad]


def _worst_lags(by_lag: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    if not by_lag:
        return {}

    def masked(row: Mapping[str, float]) -> float:
        return row.get("cap_fraction", 0.0) + row.get("floor_fraction", 0.0)

    return {
        "masked": max(by_lag, key=lambda lag: masked(by_lag[lag])),
        "mismatch_kl": max(by_lag, key=lambda lag: by_lag[lag].get("mismatch_kl", 0.0)),
    }


def _knob_values(summary: StalenessSummary) -> tuple[str, str]:
    def value(key: str) -> str:
        number = as_int(summary.run.get(key))
        return str(number) if number is not None else "?"

    return value("max_staleness"), value("max_concurrent")


def _ordered_reasons(counts: Mapping[str, int]) -> dict[str, int]:
    known = {r: counts[r] for r in DROP_REASONS if counts.get(r)}
    return {**known, **{r: n for r, n in sorted(counts.items()) if r not in known and n}}


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _string_keys(counts: Mapping[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in counts.items()}


def pause_per_update(fold: RunFold) -> dict[str, Any] | None:
    """The seconds the servers generated nothing per weight update (abort mode: from the first
    abort to the resume; keep mode: the reload's pause), as the updates reported them."""
    pauses = fold.generation_pauses
    if not pauses:
        return None
    return {
        "mode": fold.update_mode,
        "updates": len(pauses),
        "mean_s": sum(pauses) / len(pauses),
        "max_s": max(pauses),
        "total_s": sum(pauses),
    }
