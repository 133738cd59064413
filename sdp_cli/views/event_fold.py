"""One fold of a run's events: what they add up to so far. The live dashboard and the report of
a run (`sdp inspect-staleness`) read the same fold, so a count means the same on both.

Constant work per event (a batch's lags for batch_taken); only the capacity series grows with
the number of events, and a live view can leave it out (`keep_series=False`). Not thread-safe:
the dashboard guards it with its lock.
"""

from __future__ import annotations

import copy
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdp_cli.events.event_schema import (
    CAPACITY_TERMS,
    BatchTakenEvent,
    CapacityEvent,
    CurriculumEvent,
    EvalEvent,
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunFinishedEvent,
    RunStartedEvent,
    SampleDroppedEvent,
    ServerStateEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)
from sdp_cli.events.fields import as_lag_counts
from sdp_cli.views.health_view import RunHealth

# The reject reason of a rollout whose request servers died serving (inference/poison.py).
POISON = "poison"

# Finish reasons that are staleness drops: each is counted once per rollout, from its
# sample_dropped event when there is one, else from the finish.
DROP_REASONS = ("head_lag", "no_recompute", "uninformative")
# Points of the recent training history a live view plots.
HISTORY = 120


@dataclass
class EpisodeTally:
    """Episodes of the finished rollouts (multi-turn tasks): their model turns, seconds
    generating against seconds in the environment, and why they ended."""

    episodes: int = 0
    turns: int = 0
    tool_calls: int = 0
    generate_s: float = 0.0
    env_s: float = 0.0
    ends: Counter[str] = field(default_factory=Counter)

    @property
    def turns_per_episode(self) -> float:
        return self.turns / self.episodes if self.episodes else 0.0

    @property
    def env_fraction(self) -> float:
        """The environment's share of an episode's time (generation + environment)."""
        total = self.generate_s + self.env_s
        return self.env_s / total if total > 0 else 0.0

    def add(self, event: RolloutFinishedEvent) -> None:
        turns = event.episode_turns or []
        self.episodes += len(turns)
        self.turns += sum(turns)
        self.tool_calls += sum(event.episode_tool_calls or [])
        self.generate_s += sum(event.episode_generate_s or [])
        self.env_s += sum(event.episode_env_s or [])
        self.ends.update(event.episode_end or [])

    def as_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "turns_per_episode": round(self.turns_per_episode, 3),
            "tool_calls_per_episode": round(self.tool_calls / self.episodes, 3)
            if self.episodes
            else 0.0,
            "generate_s": round(self.generate_s, 3),
            "env_s": round(self.env_s, 3),
            "env_fraction": round(self.env_fraction, 4),
            "ends": dict(self.ends.most_common()),
        }


@dataclass
class VersionTally:
    submitted: int = 0
    accepted: int = 0
    consumed: int = 0
    head_lags: list[int] = field(default_factory=list)
    tail_lags: list[int] = field(default_factory=list)
    capacity: dict[str, int] | None = None
    peak_running: int | None = None


@dataclass(frozen=True)
class Drop:
    reason: str
    point: str
    version: int | None


@dataclass(frozen=True)
class CapacityPoint:
    """One capacity event: the admission terms at time `t` (seconds; since the first event of
    the log in a staleness summary)."""

    t: float
    version: int | None
    capacity: int | None
    running: int | None
    accepted_live: int | None
    concurrency_room: int | None
    staleness_room: int | None


def _history() -> deque[float]:
    return deque(maxlen=HISTORY)


@dataclass
class RunFold:
    """Everything a run's events say so far. Events are frozen, so it keeps them as they came."""

    keep_series: bool = True
    run: RunStartedEvent | None = None
    events: int = 0
    # The run's start as a view shows it (the run_started event's time, else the first event),
    # and the first and last event times.
    start_ts: float | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    version: int | None = None
    finished: bool = False
    wall_s: float | None = None
    # Training steps: the last one's index, how many the run has done (a resumed run's earlier
    # steps too) and how many this fold saw.
    step: int | None = None
    steps_done: int = 0
    steps_seen: int = 0
    last_step_ts: float | None = None
    last_train: TrainStepEvent | None = None
    train_s: float = 0.0
    submitted: int = 0
    accepted: int = 0
    drop_by_rollout: dict[int, Drop] = field(default_factory=dict)
    drops: Counter[str] = field(default_factory=Counter)
    # Rejected rollouts (not staleness drops), with the version they were submitted under.
    rejected_by_rollout: dict[int, int | None] = field(default_factory=dict)
    # Why each rejected rollout was rejected (error, poison, no_group, cancelled).
    rejected_reason: dict[int, str] = field(default_factory=dict)
    # The errors of the rollouts rejected as poison requests, the last few.
    poison_errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    batches: int = 0
    consumed: int = 0
    last_batch: BatchTakenEvent | None = None
    lag_histogram: Counter[int] = field(default_factory=Counter)
    tail_lag_histogram: Counter[int] = field(default_factory=Counter)
    tokens_by_lag: Counter[int] = field(default_factory=Counter)
    wait_s: float = 0.0
    capacity: CapacityEvent | None = None
    exhausted: Counter[str] = field(default_factory=Counter)
    series: list[CapacityPoint] = field(default_factory=list)
    versions: dict[int, VersionTally] = field(default_factory=dict)
    unversioned: VersionTally = field(default_factory=VersionTally)
    last_update: WeightUpdateEvent | None = None
    weight_updates: int = 0
    weight_update_total_s: float = 0.0
    # The trainer's share of the updates: a reload it trained through is not time it waited.
    update_s: float = 0.0
    phases: Counter[str] = field(default_factory=Counter)
    # Seconds the servers generated nothing, per update that reports it ("pause per update"),
    # and the update mode of the last one.
    generation_pauses: list[float] = field(default_factory=list)
    update_mode: str | None = None
    servers: dict[int, ServerStateEvent] = field(default_factory=dict)
    # Every restart or give-up with its reason (the log's last error included), in order.
    server_incidents: list[ServerStateEvent] = field(default_factory=list)
    last_eval: EvalEvent | None = None
    evals: list[EvalEvent] = field(default_factory=list)
    # task.curriculum: the level at the start and each rise, in order.
    curriculum: list[CurriculumEvent] = field(default_factory=list)
    rewards: deque[float] = field(default_factory=_history)
    losses: deque[float] = field(default_factory=_history)
    gen_tokens_per_s: deque[float] = field(default_factory=_history)
    samples_per_s: deque[float] = field(default_factory=_history)
    # Off-policy health of the steps, per run and by lag (the dashboard and inspect-staleness).
    health: RunHealth = field(default_factory=RunHealth)
    # Multi-turn runs: the episodes of every finished rollout (none for single-turn runs).
    episodes: EpisodeTally = field(default_factory=EpisodeTally)

    @property
    def rejected(self) -> int:
        return len(self.rejected_by_rollout)

    def rejected_by_reason(self) -> dict[str, int]:
        counts = Counter(self.rejected_reason.get(r, "error") for r in self.rejected_by_rollout)
        return dict(counts.most_common())

    def last_incident(self, server: int) -> ServerStateEvent | None:
        """The server's last restart or give-up, whose reason names what it died of."""
        return next((e for e in reversed(self.server_incidents) if e.server == server), None)

    def add_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.add(event)

    def add(self, event: Event, ts: float | None = None) -> None:
        """Fold one event in; `ts` replaces the event's own time (a live event has none)."""
        ts = event.ts if ts is None else ts
        self.events += 1
        if ts is not None:
            self.start_ts = ts if self.start_ts is None else self.start_ts
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event, ts)

    def view_copy(self) -> RunFold:
        """A copy a renderer may read while this fold goes on: the containers a live view reads
        are copied (small and bounded); the per-rollout and per-version records are shared."""
        view = copy.copy(self)
        view.drops = Counter(self.drops)
        view.servers = dict(self.servers)
        view.server_incidents = list(self.server_incidents)
        view.poison_errors = deque(self.poison_errors, maxlen=5)
        view.health = self.health.copy()
        view.episodes = copy.deepcopy(self.episodes)
        for name in ("rewards", "losses", "gen_tokens_per_s", "samples_per_s"):
            setattr(view, name, deque(getattr(self, name), maxlen=HISTORY))
        return view

    def tally(self, version: int | None) -> VersionTally:
        # Events without a version cannot be placed in the per-version table; inventing one
        # would mislead, so they only count in the totals.
        if version is None:
            return self.unversioned
        return self.versions.setdefault(version, VersionTally())

    def set_version(self, version: int | None) -> None:
        if version is not None and (self.version is None or version > self.version):
            self.version = version

    def drop(self, rollout_id: int, drop: Drop) -> None:
        previous = self.drop_by_rollout.get(rollout_id)
        if previous is not None:
            self.drops[previous.reason] -= 1
            if self.drops[previous.reason] <= 0:
                del self.drops[previous.reason]
        self.drop_by_rollout[rollout_id] = drop
        self.drops[drop.reason] += 1
        self.rejected_by_rollout.pop(rollout_id, None)
        self.rejected_reason.pop(rollout_id, None)


# --- one handler per event type -------------------------------------------------------------


def _on_run_started(fold: RunFold, event: RunStartedEvent, ts: float | None) -> None:
    fold.run = event
    fold.start_ts = ts or fold.start_ts
    fold.set_version(event.version)


def _on_run_finished(fold: RunFold, event: RunFinishedEvent, ts: float | None) -> None:
    fold.finished = True
    fold.wall_s = event.wall_s


def _on_rollout_submitted(fold: RunFold, event: RolloutSubmittedEvent, ts: float | None) -> None:
    fold.submitted += 1
    fold.tally(event.version).submitted += 1


def _on_rollout_finished(fold: RunFold, event: RolloutFinishedEvent, ts: float | None) -> None:
    if event.episode_turns:
        fold.episodes.add(event)
    if event.accepted:
        fold.accepted += 1
        fold.tally(event.version).accepted += 1
    elif event.reason in DROP_REASONS:
        if event.rollout_id not in fold.drop_by_rollout:
            fold.drop(event.rollout_id, Drop(event.reason, "finish", event.version))
    elif event.rollout_id not in fold.drop_by_rollout:
        fold.rejected_by_rollout[event.rollout_id] = event.version
        fold.rejected_reason[event.rollout_id] = event.reason or "error"
        if event.reason == POISON and event.error:
            fold.poison_errors.append(event.error)


def _on_sample_dropped(fold: RunFold, event: SampleDroppedEvent, ts: float | None) -> None:
    # The dedicated drop event is the authority: it replaces a drop inferred from the finish.
    fold.drop(event.rollout_id, Drop(event.reason, event.point, event.version))


def _on_batch_taken(fold: RunFold, event: BatchTakenEvent, ts: float | None) -> None:
    fold.last_batch = event
    fold.batches += 1
    fold.consumed += len(event.rollout_ids)
    fold.set_version(event.version)
    tally = fold.tally(event.version)
    tally.consumed += len(event.rollout_ids)
    tally.head_lags.extend(event.head_lags)
    tally.tail_lags.extend(event.tail_lags)
    fold.lag_histogram.update(event.head_lags)
    fold.tail_lag_histogram.update(event.tail_lags)
    fold.tokens_by_lag.update(as_lag_counts(event.tokens_by_lag))
    fold.wait_s += event.wait_s


def _on_capacity(fold: RunFold, event: CapacityEvent, ts: float | None) -> None:
    fold.capacity = event
    fold.set_version(event.version)
    fields = event.fields_dict()
    terms = {k: fields[k] for k in CAPACITY_TERMS}
    tally = fold.tally(event.version)
    tally.capacity = terms
    tally.peak_running = max(event.running, tally.peak_running or 0)
    _count_exhausted(fold, terms)
    if fold.keep_series:
        fold.series.append(
            CapacityPoint(
                t=ts if ts is not None else (fold.last_ts or 0.0),
                version=event.version,
                capacity=event.capacity,
                running=event.running,
                accepted_live=event.accepted_live,
                concurrency_room=event.concurrency_room,
                staleness_room=event.staleness_room,
            )
        )


def _count_exhausted(fold: RunFold, terms: Mapping[str, int]) -> None:
    capacity = terms.get("capacity")
    if capacity is None or capacity > 0:
        return
    if terms.get("concurrency_room", 1) <= 0:
        fold.exhausted["concurrency"] += 1
    if terms.get("staleness_room", 1) <= 0:
        fold.exhausted["staleness"] += 1


def _on_weight_update(fold: RunFold, event: WeightUpdateEvent, ts: float | None) -> None:
    fold.last_update = event
    fold.weight_updates += 1
    fold.weight_update_total_s += event.total_s
    fold.phases.update(event.phases)
    waited = event.trainer_wait_s
    fold.update_s += event.total_s if waited is None else waited
    if event.generation_pause_s is not None:
        fold.generation_pauses.append(event.generation_pause_s)
    fold.update_mode = event.update_mode or "abort"
    fold.set_version(event.version)


def _on_server_state(fold: RunFold, event: ServerStateEvent, ts: float | None) -> None:
    fold.servers[event.server] = event
    if event.reason and event.state in ("restarting", "dead"):
        fold.server_incidents.append(event)


def _on_train_step(fold: RunFold, event: TrainStepEvent, ts: float | None) -> None:
    fold.last_train = event
    fold.step = event.step
    fold.steps_done = event.step + 1
    fold.steps_seen += 1
    fold.last_step_ts = ts
    fold.train_s += event.step_s
    fold.health.add(event.health, event.health_by_lag)
    for series, value in (
        (fold.rewards, event.reward),
        (fold.losses, event.loss),
        (fold.gen_tokens_per_s, event.gen_tokens_per_s),
        (fold.samples_per_s, event.samples_per_s),
    ):
        if value is not None:
            series.append(value)


def _on_eval(fold: RunFold, event: EvalEvent, ts: float | None) -> None:
    fold.last_eval = event
    fold.evals.append(event)


def _on_curriculum(fold: RunFold, event: CurriculumEvent, ts: float | None) -> None:
    fold.curriculum.append(event)


# Each handler takes its own event type; the table is keyed by that type.
_HANDLERS: dict[type[Event], Callable[[RunFold, Any, float | None], None]] = {
    RunStartedEvent: _on_run_started,
    RunFinishedEvent: _on_run_finished,
    RolloutSubmittedEvent: _on_rollout_submitted,
    RolloutFinishedEvent: _on_rollout_finished,
    SampleDroppedEvent: _on_sample_dropped,
    BatchTakenEvent: _on_batch_taken,
    CapacityEvent: _on_capacity,
    WeightUpdateEvent: _on_weight_update,
    ServerStateEvent: _on_server_state,
    TrainStepEvent: _on_train_step,
    EvalEvent: _on_eval,
    CurriculumEvent: _on_curriculum,
}
