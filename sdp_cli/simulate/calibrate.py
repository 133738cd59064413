"""`sdp simulate --calibrate RUN_DIR`: the simulator's timing parameters read from a run's log.

From RUN_DIR/events.jsonl: the tokens per completion (`rollout_finished.n_tokens` over the
samples per prompt), the seconds per generated token of a rollout (submit to finish over its
tokens per completion), the trainer's step time as a line in the tokens it trained
(step_s ≈ a + b·tokens, so another batch size gets its own step time) and the mean weight
update time. The per-token latency seen in a log includes queueing, pauses for weight updates
and the wait for a group's longest completion; the simulator adds those back by itself, so the
latency it is given is corrected until the simulated run shows the measured per-token latency.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdp_cli.config.schema import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.telemetry.events import EventLog, read_events
from sdp_cli.telemetry.schema import (
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunStartedEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)

# Rounds of latency correction: each one simulates the calibrated run once (virtual time).
_LATENCY_ROUNDS = 3


@dataclass(frozen=True)
class Calibration:
    """Timing read from one run's log."""

    run_dir: Path
    n_samples: int
    # Seconds from submit to finish per token of a completion, averaged over rollouts.
    rollout_token_latency_s: float
    mean_new_tokens: float
    # step_s ≈ step_intercept_s + step_s_per_token · tokens trained in the step.
    step_intercept_s: float
    step_s_per_token: float
    update_s: float
    rollouts: int
    steps: int
    updates: int
    # Overrides that give a config the calibrated run's shape (batch, staleness, servers...).
    run_shape: tuple[str, ...] = ()

    def train_step_s(self, tokens: float) -> float:
        return max(0.0, self.step_intercept_s + self.step_s_per_token * tokens)

    def overrides_for(self, cfg: SdpConfig, token_latency_s: float) -> list[str]:
        """simulate.* overrides for simulating `cfg` (its batch size sets the step time)."""
        return self.simulate_overrides(
            cfg.rollout.batch_size * cfg.rollout.n_samples, token_latency_s
        )

    def overrides_for_run(self, token_latency_s: float) -> list[str]:
        """Overrides that simulate the calibrated run itself."""
        batch = _shape_value(self.run_shape, "rollout.batch_size")
        return [
            *self.run_shape,
            *self.simulate_overrides(batch * self.n_samples, token_latency_s),
        ]

    def simulate_overrides(self, samples_per_step: int, token_latency_s: float) -> list[str]:
        tokens = samples_per_step * self.mean_new_tokens
        return [
            f"simulate.token_latency_s={token_latency_s:.6g}",
            f"simulate.mean_new_tokens={max(1, round(self.mean_new_tokens))}",
            f"simulate.train_step_s={self.train_step_s(tokens):.6g}",
            f"simulate.update_s={self.update_s:.6g}",
        ]


def read_calibration(run_dir: Path) -> Calibration:
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        raise SdpError(f"--calibrate: no run log at {path}")
    events = list(read_events(path))
    started = [e for e in events if isinstance(e, RunStartedEvent)]
    if not started:
        raise SdpError(f"--calibrate: {path} has no run_started event")
    n_samples = started[0].n_samples
    latencies, lengths = rollout_timings(events, n_samples)
    steps = [e for e in events if isinstance(e, TrainStepEvent) and not e.skipped]
    updates = [e.total_s for e in events if isinstance(e, WeightUpdateEvent)]
    if not latencies or not steps:
        raise SdpError(
            f"--calibrate: {path} has {len(latencies)} finished rollouts with tokens and "
            f"{len(steps)} train steps; calibration needs at least one of each"
        )
    intercept, slope = line_fit([float(e.tokens) for e in steps], [e.step_s for e in steps])
    return Calibration(
        run_dir=Path(run_dir),
        n_samples=n_samples,
        rollout_token_latency_s=statistics.fmean(latencies),
        mean_new_tokens=statistics.fmean(lengths),
        step_intercept_s=intercept,
        step_s_per_token=slope,
        update_s=statistics.fmean(updates) if updates else 0.0,
        rollouts=len(latencies),
        steps=len(steps),
        updates=len(updates),
        run_shape=run_shape(started[0]),
    )


def run_shape(started: RunStartedEvent) -> tuple[str, ...]:
    return (
        f"train.steps={started.steps}",
        f"rollout.max_staleness={started.max_staleness}",
        f"rollout.batch_size={started.batch_size}",
        f"rollout.strategy={started.strategy}",
        f"train.prox_mode={started.prox_mode}",
        f"rollout.n_samples={started.n_samples}",
        f"rollout.max_concurrent={started.max_concurrent}",
        f"server.count={started.server_count}",
    )


def _shape_value(shape: Sequence[str], key: str) -> int:
    for override in shape:
        name, _, value = override.partition("=")
        if name == key:
            return int(value)
    raise KeyError(key)


def rollout_timings(events: Sequence[Event], n_samples: int) -> tuple[list[float], list[float]]:
    """(seconds per token of a completion, tokens per completion) of each finished rollout."""
    submitted = {
        e.rollout_id: e.ts
        for e in events
        if isinstance(e, RolloutSubmittedEvent) and e.ts is not None
    }
    latencies: list[float] = []
    lengths: list[float] = []
    for event in events:
        if not isinstance(event, RolloutFinishedEvent) or event.n_tokens <= 0:
            continue
        start = submitted.get(event.rollout_id)
        if start is None or event.ts is None:
            continue
        per_completion = event.n_tokens / max(n_samples, 1)
        latencies.append((event.ts - start) / per_completion)
        lengths.append(per_completion)
    return latencies, lengths


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); a flat line at the mean when x does not vary."""
    if len(xs) < 2 or statistics.pvariance(xs) == 0:
        return statistics.fmean(ys), 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def calibrated_token_latency(
    calibration: Calibration,
    load_run_config: Callable[[list[str]], SdpConfig],
    simulate_log: Callable[[SdpConfig, Path], None],
    scratch: Path,
) -> float:
    """The simulator's per-token latency that reproduces the run's measured rollout latency.

    `load_run_config(overrides)`: the calibrated run's own shape plus `overrides`;
    `simulate_log(cfg, path)`: simulate `cfg` writing its log to `path`."""
    target = calibration.rollout_token_latency_s
    latency = target
    for round_index in range(_LATENCY_ROUNDS):
        cfg = load_run_config(calibration.overrides_for_run(latency))
        log = scratch / f"round-{round_index}" / "events.jsonl"
        simulate_log(cfg, log)
        simulated = read_calibration(log.parent).rollout_token_latency_s
        if simulated <= 0:
            break
        latency *= target / simulated
    return latency


def simulate_to_log(cfg: SdpConfig, path: Path) -> None:
    from sdp_cli.simulate.run import run_simulation

    path.parent.mkdir(parents=True, exist_ok=True)
    with EventLog(path) as events:
        run_simulation(cfg, events)
