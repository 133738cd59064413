"""The event schema: every event type of the run log and its fields, in one place.

A run log (`RUN_DIR/events.jsonl`) holds one JSON object per line: `ts` (Unix seconds, stamped
by the sink when not given), `type` (the event's name) and the event's fields. Writers build one
of the frozen dataclasses below and hand it to `EventSink.emit(event)`; readers (the dashboard,
`sdp inspect-staleness`, its plot, tests) turn each line back into the same dataclass with
`parse_event`. A renamed or retyped field therefore fails where the dataclass is built or
checked, never silently on screen.

Adding an event type (or a field):
1. Write a `@dataclass(frozen=True, kw_only=True)` subclass of `Event` below, with the class
   variable `type` set to the name written in the log, one annotated field per key, and a
   comment per field that is not obvious. Field types are what JSON holds: int, float, str,
   bool, `X | None`, `list[X]`, `dict[str, X]`. Fields added to an existing type get a default
   (None for "not known"), so logs written before the field existed still parse.
2. Register it with the `@event_type` decorator: that puts it in `EVENT_TYPES`, which every
   reader uses. Emit it where it happens: `events.emit(MyEvent(...))`.
3. Readers that do not care about it need no change: they skip types they do not handle. A
   reader that shows it adds a handler keyed by the class (see the dashboard's `_HANDLERS`).
4. Add the name to `ALL_TYPES` in tests/unit/events/test_event_schema.py. The logs of a
   simulated run and of the end-to-end vLLM run are parsed strictly there and in
   tests/integration/test_train_e2e.py, so a writer that logs a key the dataclass does not
   declare fails a test.

Rules the parser enforces (`parse_event`): a line whose `type` is not in `EVENT_TYPES` is
"unknown" (a newer sdp wrote it; readers skip it); a known type with a missing required field or a
value of the wrong type raises `EventSchemaError` (readers count such a line as skipped, tests
fail on it); keys the dataclass does not declare are ignored unless `strict=True`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar, Union

# ---- the base class and the registry --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    """One line of the run log. `ts` is stamped by the sink at write time when left None."""

    type: ClassVar[str]
    ts: float | None = None

    def fields_dict(self) -> dict[str, Any]:
        """The event's own fields (without `ts` and `type`), shallow: lists stay shared."""
        return {name: getattr(self, name) for name in _field_names(type(self))}


EVENT_TYPES: dict[str, type[Event]] = {}

E = TypeVar("E", bound=type[Event])


def event_type(cls: E) -> E:
    """Class decorator: register an event dataclass under its `type` name."""
    name = cls.__dict__.get("type")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must set the class variable `type`")
    if name in EVENT_TYPES:
        raise TypeError(f"event type {name!r} is registered twice")
    EVENT_TYPES[name] = cls
    return cls


# ---- the events -----------------------------------------------------------------------------


@event_type
@dataclass(frozen=True, kw_only=True)
class RunStartedEvent(Event):
    type: ClassVar[str] = "run_started"
    run: str
    steps: int
    max_staleness: int
    batch_size: int
    strategy: str
    prox_mode: str
    n_samples: int
    max_concurrent: int
    server_count: int
    resumed_from_step: int = 0
    version: int = 0
    # "train" or "simulate": what wrote the log.
    mode: str = "train"
    # How the weight updates ran: train.overlap_reload where it applies (η ≥ 1), and whether
    # continuations brought their proximal scores (rollout.score_continuations, segment mode).
    # None in logs written before these were recorded.
    overlap_reload: bool | None = None
    score_continuations: bool | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class ServerStateEvent(Event):
    """A server changed state (starting, ready, restarting, dead) or version."""

    type: ClassVar[str] = "server_state"
    # The server's index in the fleet.
    server: int
    address: str
    state: str
    version: int | None = None
    restarts: int = 0
    pid: int | None = None
    reason: str | None = None
    # The machine the server runs on; None for a local process.
    node: str | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class RolloutSubmittedEvent(Event):
    type: ClassVar[str] = "rollout_submitted"
    rollout_id: int
    # The executor version when it was admitted.
    version: int
    # The data position (prompt of the task's stream) it generates for; None without one.
    position: int | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class RolloutFinishedEvent(Event):
    """A rollout came back: accepted into the buffer, dropped as stale, or rejected."""

    type: ClassVar[str] = "rollout_finished"
    rollout_id: int
    version: int
    accepted: bool
    # Why it was not accepted (a drop or reject reason); None when accepted.
    reason: str | None = None
    # Versions and lags of its oldest (head) and newest (tail) tokens; None without a group.
    head_version: int | None = None
    tail_version: int | None = None
    head_lag: int | None = None
    tail_lag: int | None = None
    n_tokens: int = 0
    # Segments of the most interrupted completion in the group.
    n_segments: int = 0
    # Mean reward of the group's samples.
    reward: float | None = None
    error: str | None = None
    # Per completion, in sample order: seconds from the rollout's start to its last token, its
    # tokens and its prompt's tokens (what `sdp simulate --calibrate` fits latency against
    # concurrency and prefill with).
    completion_s: list[float] | None = None
    completion_tokens: list[int] | None = None
    prompt_tokens: list[int] | None = None
    # Episodes only, per episode in sample order: model turns, seconds generating (the model
    # turns' requests), seconds in the environment (reset, steps, tools) and why it ended
    # (done, max_turns, context); and its tool results (turns of role `tool`).
    episode_turns: list[int] | None = None
    episode_tool_calls: list[int] | None = None
    episode_generate_s: list[float] | None = None
    episode_env_s: list[float] | None = None
    episode_end: list[str] | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class SampleDroppedEvent(Event):
    """A rollout group thrown away as stale, at finish, at take or at the purge of an update."""

    type: ClassVar[str] = "sample_dropped"
    rollout_id: int
    reason: str
    # Where: "finish", "take" or "purge".
    point: str
    head_lag: int
    tail_lag: int
    version: int
    head_version: int | None = None
    tail_version: int | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class UninformativeWarningEvent(Event):
    """Dynamic sampling: the share of uninformative groups (all rewards equal) over the window
    reached rollout.max_uninformative_fraction; one more window like that stops the run."""

    type: ClassVar[str] = "uninformative_warning"
    version: int
    # Uninformative groups among the last `window` finished ones.
    fraction: float
    window: int
    max_fraction: float
    message: str


@event_type
@dataclass(frozen=True, kw_only=True)
class CapacityEvent(Event):
    """Every term of the capacity formula and the executor's counters, when they change."""

    type: ClassVar[str] = "capacity"
    version: int
    max_concurrent: int
    running: int
    accepted_live: int
    staleness_limit: int
    concurrency_room: int
    staleness_room: int
    capacity: int
    submitted: int
    rejected: int
    dropped_total: int
    consumed: int
    queue_size: int


# The formula's terms, as `CapacityEvent` names them (the report and the dashboard show these).
CAPACITY_TERMS = (
    "max_concurrent",
    "running",
    "accepted_live",
    "staleness_limit",
    "concurrency_room",
    "staleness_room",
    "capacity",
)
EXECUTOR_COUNTERS = ("submitted", "rejected", "dropped_total", "consumed", "queue_size")


@event_type
@dataclass(frozen=True, kw_only=True)
class BatchTakenEvent(Event):
    """The trainer took a batch; one head and tail lag per rollout group in it."""

    type: ClassVar[str] = "batch_taken"
    version: int
    rollout_ids: list[int]
    head_lags: list[int]
    tail_lags: list[int]
    # Tokens of the batch by version lag; keys are lags as strings (JSON object keys).
    tokens_by_lag: dict[str, int]
    wait_s: float
    # The 0-based trainer step the batch is for; None when the taker gave none.
    step: int | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class ProximalRecomputeEvent(Event):
    type: ClassVar[str] = "proximal_recompute"
    version: int
    # Trajectories whose v-1 tokens were rewritten, those a take during the update wrote from
    # early or continuation scores included.
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    # Of `samples`, those scored early (before the update began).
    early_samples: int = 0
    # Of `samples`, those whose scores came with their continuation's prefill
    # (rollout.score_continuations).
    continued_samples: int = 0
    # Scoring calls made during the update.
    batches: int = 0
    seconds: float = 0.0
    # Of `samples`, those that finished while the update was under way (the second pass).
    late_samples: int = 0
    # False if some rollout still generated under v when the settle deadline passed.
    settled: bool = True


@event_type
@dataclass(frozen=True, kw_only=True)
class WeightUpdateEvent(Event):
    type: ClassVar[str] = "weight_update"
    # The version the servers hold afterwards.
    version: int
    # Seconds per phase of the update (pause_s, recompute_s, export_s, reload_s, ...).
    phases: dict[str, float]
    total_s: float
    # The servers' own timing of the reload, as the client reports it.
    server_phases: dict[str, float] = dataclasses.field(default_factory=dict)
    weights_dir: str | None = None
    # Seconds the trainer waited for the update: total_s, or less when it took its next batch
    # before the reload and trained on it meanwhile (train.overlap_reload). None in older logs.
    trainer_wait_s: float | None = None
    # Seconds the servers generated nothing for this update ("pause per update"): abort mode,
    # from the first abort (or the reload's pause) until the executor resumed and
    # resubmitted; keep mode, from the reload's pause until the executor resumed. Re-prefilling
    # the aborted completions comes on top in abort mode. None in older logs.
    generation_pause_s: float | None = None
    # train.update_mode of the update: "abort" or "keep". None in older logs (abort).
    update_mode: str | None = None


# The keys of a `health` record of TrainStepEvent (one per lag in `health_by_lag`), in display
# order; the step's record adds `uninformative_group_fraction` (sdp_cli/trainer/health.py).
HEALTH_KEYS = (
    "tokens",
    "mismatch_kl",
    "clip_fraction",
    "clip_low_fraction",
    "clip_high_fraction",
    "cap_fraction",
    "floor_fraction",
    "behav_weight_p99",
    "behav_weight_max",
    "adv_mean",
    "adv_std",
    "adv_min",
    "adv_max",
    "adv_zero_fraction",
)


@event_type
@dataclass(frozen=True, kw_only=True)
class TrainStepEvent(Event):
    type: ClassVar[str] = "train_step"
    # 0-based index of the step; with no resume it equals the version trained.
    step: int
    version: int
    reward: float | None = None
    loss: float | None = None
    clip_frac: float | None = None
    behav_weight_mean: float | None = None
    behav_weight_max: float | None = None
    masked_frac: float | None = None
    grad_norm: float | None = None
    # Mean token entropy of the current policy, and a KL estimate behaviour -> current (k3).
    entropy: float | None = None
    kl: float | None = None
    # Learning rate of the step; KL to the reference model when train.kl_coef > 0.
    lr: float | None = None
    ref_kl: float | None = None
    # The loss or gradient norm was not finite: the weights were left as they were.
    skipped: bool = False
    # Steps skipped so far in this run.
    skipped_steps: int = 0
    # Every statistic the actor returned.
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    # Off-policy health of the step's trained tokens (sdp_cli/trainer/health.py: mismatch_kl,
    # clip_fraction, cap_fraction, ...), and the same by version lag, keyed by str(lag).
    health: dict[str, float] = dataclasses.field(default_factory=dict)
    health_by_lag: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    rollouts: int = 0
    rollout_ids: list[int] = dataclasses.field(default_factory=list)
    # Data positions identify a sample across a resume (rollout ids restart at v·B).
    positions: list[int | None] = dataclasses.field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    # The trainer's cycle: waiting for the batch, the optimizer step, the weight update.
    wait_s: float = 0.0
    step_s: float = 0.0
    update_s: float = 0.0
    samples_per_s: float | None = None
    gen_tokens_per_s: float | None = None
    # task.curriculum: the level new training prompts get after this step; None when off.
    curriculum_level: int | None = None


@event_type
@dataclass(frozen=True, kw_only=True)
class EvalEvent(Event):
    """Held-out evaluation of the weights the servers hold (`eval.every`)."""

    type: ClassVar[str] = "eval"
    # Training steps completed when it ran (0: before the first step).
    step: int
    version: int
    # Fraction of completions whose reward is 1 (fully correct).
    accuracy: float
    # Fraction of prompts with at least one fully correct completion among k = n_samples.
    pass_at_k: float
    k: int
    mean_reward: float
    n_prompts: int
    temperature: float
    seconds: float


@event_type
@dataclass(frozen=True, kw_only=True)
class CurriculumEvent(Event):
    """task.curriculum raised the level: training prompts from data position `position` on are
    at `level` (the first event, at step 0, is the start level)."""

    type: ClassVar[str] = "curriculum"
    # Training steps completed when it was decided.
    step: int
    position: int
    level: int
    # step or reward: what moved it (start for the first level).
    reason: str


@event_type
@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    version: int
    path: str


@event_type
@dataclass(frozen=True, kw_only=True)
class RunFinishedEvent(Event):
    type: ClassVar[str] = "run_finished"
    steps: int
    version: int
    # Seconds in the training loop (from the first take to the last update), not the whole run.
    wall_s: float
    # Seconds from run_started to run_finished: the loop plus starting servers and the first
    # weight load (what the dashboard header calls "elapsed").
    elapsed_s: float | None = None
    # Positions below next_position are trained except untrained_positions (in flight or
    # buffered at the end); None in logs written before positions were kept.
    next_position: int | None = None
    untrained_positions: list[int] | None = None


# ---- parsing --------------------------------------------------------------------------------


class EventSchemaError(ValueError):
    """A line of a known event type that does not fit its dataclass."""


def parse_event(data: Mapping[str, Any], *, strict: bool = False) -> Event | None:
    """A log object → its typed event; None for an unknown `type`.

    Raises EventSchemaError when a known type misses a required field or a value has the wrong
    type; `strict=True` also refuses keys the dataclass does not declare (tests of writers)."""
    cls = EVENT_TYPES.get(str(data.get("type")))
    if cls is None:
        return None
    hints = _field_hints(cls)
    if strict:
        extra = sorted(set(data) - set(hints) - {"type"})
        if extra:
            raise EventSchemaError(f"{cls.type}: fields not in the schema: {extra}")
    values: dict[str, Any] = {}
    for name, hint in hints.items():
        if name not in data:
            continue
        value = data[name]
        if not _conforms(value, hint):
            raise EventSchemaError(f"{cls.type}.{name}: {value!r} is not {_hint_text(hint)}")
        values[name] = _coerced(value, hint)
    try:
        return cls(**values)
    except TypeError as exc:
        raise EventSchemaError(f"{cls.type}: {exc}") from None


@cache
def _field_names(cls: type[Event]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "ts")


@cache
def _field_hints(cls: type[Event]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits an annotation of this module (scalars, optionals, list, dict)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _conforms(k, key) and _conforms(v, item) for k, v in value.items()
        )
    check = _SCALAR_CHECKS.get(hint)
    return check is not None and check(value)


def _coerced(value: Any, hint: Any) -> Any:
    # JSON writes 2.0 as 2.0 but a float field may have been written from an int: keep floats.
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_SCALAR_CHECKS: dict[Any, Callable[[Any], bool]] = {
    # bool is an int subclass, but a flag where a count belongs is a writer bug.
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
}
