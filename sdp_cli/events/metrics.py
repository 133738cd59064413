"""Curves where people look for them: the run's events as TensorBoard and W&B scalars.

`MetricsSink` wraps the event sink (like the dashboard does), so the curves carry the same
numbers under the same names as `events.jsonl`: `train/<field>` from `train_step` (with
`train/curriculum_level` under task.curriculum), `eval/<field>` from `eval`, `capacity/<term>`
from `capacity`, `update/<phase>` from `weight_update`, `drops/<reason>` (running totals) from
`sample_dropped`, `health/<key>` and `health/lag<k>/<key>` from `train_step`'s health fields,
and lag histograms from `batch_taken`. The x axis is the trainer step. Writers are the
backends' own APIs: `torch.utils.tensorboard.SummaryWriter` and `wandb.init(mode=...)`, offline
by default.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from sdp_cli.events.event_log import EventSink
from sdp_cli.events.event_schema import (
    CAPACITY_TERMS,
    BatchTakenEvent,
    CapacityEvent,
    EvalEvent,
    Event,
    RolloutFinishedEvent,
    SampleDroppedEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)

TRAIN_FIELDS = (
    "reward",
    "loss",
    "clip_frac",
    "behav_weight_mean",
    "behav_weight_max",
    "masked_frac",
    "grad_norm",
    "entropy",
    "kl",
    "ref_kl",
    "lr",
    "samples_per_s",
    "gen_tokens_per_s",
    "wait_s",
    "step_s",
    "update_s",
    "skipped_steps",
    "curriculum_level",
)
EVAL_FIELDS = ("accuracy", "pass_at_k", "mean_reward", "seconds")


class MetricWriter(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def histogram(self, name: str, values: Sequence[float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    def __init__(self, log_dir: Path) -> None:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        self.torch = torch
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def histogram(self, name: str, values: Sequence[float], step: int) -> None:
        if values:
            self.writer.add_histogram(name, self.torch.tensor(list(values)), global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    def __init__(self, run_dir: Path, project: str, mode: str, name: str, config: Any) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=str(run_dir),
            name=name,
            config=config,
            reinit="finish_previous",
            # Its console output would scribble over the dashboard.
            settings=wandb.Settings(silent=True, console="off", init_timeout=300),
        )
        self.run.define_metric("trainer_step")
        self.run.define_metric("*", step_metric="trainer_step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "trainer_step": step})

    def histogram(self, name: str, values: Sequence[float], step: int) -> None:
        if values:
            self.run.log({name: self.wandb.Histogram(list(values)), "trainer_step": step})

    def close(self) -> None:
        self.run.finish()


def finite_values(event: Event, names: Sequence[str], prefix: str) -> dict[str, float]:
    """`prefix/name` → value for each named field that holds a number."""
    out: dict[str, float] = {}
    for name in names:
        value = getattr(event, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{name}"] = float(value)
    return out


def health_scalars(event: TrainStepEvent) -> dict[str, float]:
    """`health/<key>` for the step and `health/lag<k>/<key>` by version lag, finite ones only
    (a backend refuses NaN and infinities)."""
    out = {f"health/{key}": value for key, value in event.health.items()}
    for lag, values in event.health_by_lag.items():
        out.update({f"health/lag{lag}/{key}": value for key, value in values.items()})
    return {name: float(value) for name, value in out.items() if math.isfinite(value)}


def episode_scalars(event: RolloutFinishedEvent) -> dict[str, float]:
    """A finished group of episodes: mean model turns, generation and environment seconds
    per episode, and the share that ended at the context limit."""
    turns = event.episode_turns or []
    n = len(turns)
    ends = event.episode_end or []
    return {
        "episodes/turns": sum(turns) / n,
        "episodes/tool_calls": sum(event.episode_tool_calls or []) / n,
        "episodes/generate_s": sum(event.episode_generate_s or []) / n,
        "episodes/env_s": sum(event.episode_env_s or []) / n,
        "episodes/context_end_fraction": ends.count("context") / n,
    }


class MetricsSink:
    """Forwards every event to `inner` and turns the ones with curves into backend calls."""

    def __init__(self, inner: EventSink, writers: list[MetricWriter]) -> None:
        self.inner = inner
        self.writers = writers
        self._lock = threading.Lock()
        self._step = 0
        self._drops: Counter[str] = Counter()

    def emit(self, event: Event) -> None:
        self.inner.emit(event)
        with self._lock:
            self._record(event)

    def _record(self, event: Event) -> None:
        if isinstance(event, TrainStepEvent):
            self._step = event.step + 1
            self._scalars(finite_values(event, TRAIN_FIELDS, "train"), event.step)
            self._scalars(health_scalars(event), event.step)
        elif isinstance(event, EvalEvent):
            values = finite_values(event, EVAL_FIELDS, "eval")
            values[f"eval/pass@{event.k}"] = values.pop("eval/pass_at_k")
            self._scalars(values, event.step)
        elif isinstance(event, CapacityEvent):
            self._scalars(finite_values(event, CAPACITY_TERMS, "capacity"), self._step)
        elif isinstance(event, WeightUpdateEvent):
            phases = {f"update/{name}": float(value) for name, value in event.phases.items()}
            scalars = {**phases, "update/total_s": event.total_s}
            if event.generation_pause_s is not None:
                scalars["update/generation_pause_s"] = event.generation_pause_s
            self._scalars(scalars, self._step)
        elif isinstance(event, SampleDroppedEvent):
            self._drops[event.reason] += 1
            self._scalars({f"drops/{event.reason}": float(self._drops[event.reason])}, self._step)
        elif isinstance(event, BatchTakenEvent):
            step = event.step if event.step is not None else self._step
            self._histogram("lag/head_lag", [float(lag) for lag in event.head_lags], step)
            by_lag = {f"lag/tokens_lag_{k}": float(n) for k, n in event.tokens_by_lag.items()}
            self._scalars(by_lag, step)
        elif isinstance(event, RolloutFinishedEvent) and event.episode_turns:
            self._scalars(episode_scalars(event), self._step)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if values:
            for writer in self.writers:
                writer.scalars(values, step)

    def _histogram(self, name: str, values: Sequence[float], step: int) -> None:
        for writer in self.writers:
            writer.histogram(name, values, step)

    def close(self) -> None:
        with self._lock:
            for writer in self.writers:
                writer.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def open_writers(
    backends: Sequence[str], run_dir: Path, *, project: str, mode: str, name: str, config: Any
) -> list[MetricWriter]:
    """One writer per named backend: `tensorboard` writes `run_dir/tensorboard/`, `wandb`
    `run_dir/wandb/`."""
    writers: list[MetricWriter] = []
    for backend in backends:
        if backend == "tensorboard":
            writers.append(TensorBoardWriter(run_dir / "tensorboard"))
        elif backend == "wandb":
            writers.append(WandbWriter(run_dir, project, mode, name, config))
    return writers
