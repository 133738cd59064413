"""`sdp simulate --calibrate RUN_DIR`: the simulator's timing parameters read from a run's log.

From RUN_DIR/events.jsonl: the tokens per completion (`rollout_finished.n_tokens` over the
samples per prompt), the seconds per generated token of a rollout (submit to finish over its
tokens per completion) as a line in the completions decoding on a server meanwhile
(latency ≈ a + b·sequences: a server decodes its batch in one step, slower as it grows), the
trainer's step time as a line in the tokens it trained (step_s ≈ a + b·tokens, so another batch
size gets its own step time) and the mean weight update time. The per-token latency seen in a
log includes queueing, pauses for weight updates and the wait for a group's longest completion;
the simulator adds those back by itself, so the latency line it is given is scaled until the
simulated run shows the measured mean per-token latency.
"""

from __future__ import annotations

import bisect
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
    # Seconds per token of a completion (start to last token), averaged over completions.
    rollout_token_latency_s: float
    # That latency ≈ latency_intercept_s + latency_per_seq_s · completions decoding per server.
    latency_intercept_s: float
    latency_per_seq_s: float
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

    def overrides_for(self, cfg: SdpConfig, latency_scale: float) -> list[str]:
        """simulate.* overrides for simulating `cfg` (its batch size sets the step time), with
        the latency line scaled by `latency_scale`."""
        return self.simulate_overrides(
            cfg.rollout.batch_size * cfg.rollout.n_samples, latency_scale
        )

    def overrides_for_run(self, latency_scale: float) -> list[str]:
        """Overrides that simulate the calibrated run itself."""
        batch = _shape_value(self.run_shape, "rollout.batch_size")
        return [
            *self.run_shape,
            *self.simulate_overrides(batch * self.n_samples, latency_scale),
        ]

    def simulate_overrides(self, samples_per_step: int, latency_scale: float) -> list[str]:
        tokens = samples_per_step * self.mean_new_tokens
        return [
            f"simulate.token_latency_s={self.latency_intercept_s * latency_scale:.6g}",
            f"simulate.token_latency_per_seq_s={self.latency_per_seq_s * latency_scale:.6g}",
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
    latencies, lengths, decoding = rollout_timings(events, n_samples, started[0].server_count)
    steps = [e for e in events if isinstance(e, TrainStepEvent) and not e.skipped]
    updates = [e.total_s for e in events if isinstance(e, WeightUpdateEvent)]
    if not latencies or not steps:
        raise SdpError(
            f"--calibrate: {path} has {len(latencies)} finished rollouts with tokens and "
            f"{len(steps)} train steps; calibration needs at least one of each"
        )
    intercept, slope = line_fit([float(e.tokens) for e in steps], [e.step_s for e in steps])
    latency_intercept, latency_slope = latency_line(decoding, latencies)
    return Calibration(
        run_dir=Path(run_dir),
        n_samples=n_samples,
        rollout_token_latency_s=statistics.fmean(latencies),
        latency_intercept_s=latency_intercept,
        latency_per_seq_s=latency_slope,
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


def rollout_timings(
    events: Sequence[Event], n_samples: int, servers: int = 1
) -> tuple[list[float], list[float], list[float]]:
    """(seconds per token, tokens, mean completions decoding per server meanwhile) of each
    finished completion; of each rollout's mean completion in logs without completion times."""
    spans = completion_spans(events, n_samples)
    in_flight = InFlight([(start, end, weight) for start, end, _, weight in spans])
    latencies = [(end - start) / tokens for start, end, tokens, _ in spans]
    lengths = [tokens for _, _, tokens, _ in spans]
    decoding = [in_flight.mean(start, end) / max(servers, 1) for start, end, _, _ in spans]
    return latencies, lengths, decoding


def completion_spans(
    events: Sequence[Event], n_samples: int
) -> list[tuple[float, float, float, int]]:
    """(start, end, tokens, completions it stands for) of every finished completion with tokens:
    one per completion when the log has `completion_s`, else one per rollout (submit to finish,
    its tokens per completion, standing for its `n_samples` completions)."""
    submitted = {
        e.rollout_id: e.ts
        for e in events
        if isinstance(e, RolloutSubmittedEvent) and e.ts is not None
    }
    spans: list[tuple[float, float, float, int]] = []
    for event in events:
        if not isinstance(event, RolloutFinishedEvent) or event.n_tokens <= 0 or event.ts is None:
            continue
        if event.completion_s and event.completion_tokens:
            # The group is done when its last completion is.
            start = event.ts - max(event.completion_s)
            spans += [
                (start, start + seconds, float(tokens), 1)
                for seconds, tokens in zip(event.completion_s, event.completion_tokens, strict=True)
                if tokens > 0 and seconds > 0
            ]
            continue
        start = submitted.get(event.rollout_id)
        if start is not None and event.ts > start:
            per_completion = event.n_tokens / max(n_samples, 1)
            spans.append((start, event.ts, per_completion, max(n_samples, 1)))
    return spans


class InFlight:
    """How many of a set of weighted [start, end) intervals are open, on average over any
    interval."""

    def __init__(self, spans: Sequence[tuple[float, float, int]]) -> None:
        changes = sorted(
            [(start, weight) for start, _, weight in spans]
            + [(end, -weight) for _, end, weight in spans]
        )
        self._times = [t for t, _ in changes]
        # Weight open just after each change, and the integral of that weight up to it.
        self._open: list[int] = []
        self._area: list[float] = []
        open_now, area, last = 0, 0.0, changes[0][0] if changes else 0.0
        for t, delta in changes:
            area += open_now * (t - last)
            open_now += delta
            last = t
            self._open.append(open_now)
            self._area.append(area)

    def _area_at(self, t: float) -> float:
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0:
            return 0.0
        return self._area[i] + self._open[i] * (t - self._times[i])

    def mean(self, start: float, end: float) -> float:
        return (self._area_at(end) - self._area_at(start)) / (end - start)


def latency_line(decoding: Sequence[float], latencies: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of per-token latency against completions decoding, neither negative.

    A run shows a narrow range of batch sizes, so the intercept is poorly known: when the
    least-squares line crosses below zero, the line through the origin; when it falls, the
    server did not get slower with more work and the flat line at the mean stands."""
    intercept, slope = line_fit(decoding, latencies)
    if slope <= 0:
        return statistics.fmean(latencies), 0.0
    if intercept < 0:
        through_origin = sum(x * y for x, y in zip(decoding, latencies, strict=True))
        return 0.0, through_origin / sum(x * x for x in decoding)
    return intercept, slope


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); a flat line at the mean when x does not vary."""
    if len(xs) < 2 or statistics.pvariance(xs) == 0:
        return statistics.fmean(ys), 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def calibrated_latency_scale(
    calibration: Calibration,
    load_run_config: Callable[[list[str]], SdpConfig],
    simulate_log: Callable[[SdpConfig, Path], None],
    scratch: Path,
) -> float:
    """The factor on the latency line with which the simulated run shows the run's measured
    mean per-token latency.

    `load_run_config(overrides)`: the calibrated run's own shape plus `overrides`;
    `simulate_log(cfg, path)`: simulate `cfg` writing its log to `path`."""
    target = calibration.rollout_token_latency_s
    scale = 1.0
    for round_index in range(_LATENCY_ROUNDS):
        cfg = load_run_config(calibration.overrides_for_run(scale))
        log = scratch / f"round-{round_index}" / "events.jsonl"
        simulate_log(cfg, log)
        simulated = read_calibration(log.parent).rollout_token_latency_s
        if simulated <= 0:
            break
        scale *= target / simulated
    return scale


def simulate_to_log(cfg: SdpConfig, path: Path) -> None:
    from sdp_cli.simulate.run import run_simulation

    path.parent.mkdir(parents=True, exist_ok=True)
    with EventLog(path) as events:
        run_simulation(cfg, events)
