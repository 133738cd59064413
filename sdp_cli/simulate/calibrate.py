"""`sdp simulate --calibrate RUN_DIR`: the simulator's timing parameters read from a run's log.

From RUN_DIR/events.jsonl: the tokens per completion (`rollout_finished.n_tokens` over the
samples per prompt) and their 20 quantiles; the server time of a completion (start to last
token; submit to finish of its rollout in older logs) as seconds ≈ prefill_s·k +
tokens·(a + b·c), where k is the completions in flight per server just after it started (the
prompts prefilled ahead of it and its own, when requests arrive together) and c the completions
in flight per server while it decodes, averaged over its tokens (a server decodes its batch in
one step, slower as it grows), with prefill_s = b × the prompt tokens in a vLLM log that has
them; the trainer's step time, its first step after each start left out, as a line in the
tokens it trained (step_s ≈ a + b·tokens, so another batch size gets its own step time;
proportional above the optimizer's fixed time for a run at one batch size) and the mean weight
update time, split into the export (the trainer always waits for it) and the rest (the servers'
reload, which the trainer can overlap with its next step). The seconds seen in a log include
queueing and pauses for weight updates; the simulator adds those back by itself, so the server
time it is given is scaled until the simulated run shows the measured mean completion seconds.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdp_cli.config.schema import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import EventLog, read_events
from sdp_cli.events.event_schema import (
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunStartedEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)

# Rounds of latency correction: each one simulates the calibrated run once (virtual time).
_LATENCY_ROUNDS = 3
# Completions that start within this share of a completion's seconds after it count as arriving
# with it: a log's start times carry the jitter of submission and of the finish events' stamps.
_TOGETHER = 0.01
# Rounds of the server-time fit after the first (each recomputes the decoding batch).
_FIT_ROUNDS = 12


@dataclass(frozen=True)
class Calibration:
    """Timing read from one run's log."""

    run_dir: Path
    n_samples: int
    # Seconds per token of a completion (start to last token), averaged over completions.
    rollout_token_latency_s: float
    # Seconds of a completion, start to last token, averaged over completions.
    completion_s: float
    # Those seconds ≈ prefill_s · prefills it waits for + tokens · (latency_intercept_s +
    # latency_per_seq_s · completions decoding per server).
    prefill_s: float
    latency_intercept_s: float
    latency_per_seq_s: float
    mean_new_tokens: float
    # Quantiles of the completions' tokens (simulate.new_tokens): a run's lengths are far from
    # the simulator's gamma draw when many stop at rollout.max_new_tokens, and a step at η = 0
    # waits for its longest completion.
    new_tokens: tuple[int, ...]
    # Mean prompt tokens when prefill was tied to the latency line (prefill_s = latency_per_seq_s
    # × prompt tokens, a vLLM log); None when it was fitted on its own.
    prompt_tokens: float | None
    # step_s ≈ step_intercept_s + step_s_per_token · tokens trained in the step.
    step_intercept_s: float
    step_s_per_token: float
    # Mean seconds of the weights' export, and of the rest of an update (reload and the rest).
    export_s: float
    update_s: float
    rollouts: int
    steps: int
    updates: int
    # Whether the log timed each completion; older logs have one span per rollout.
    per_completion: bool = True
    # Overrides that give a config the calibrated run's shape (batch, staleness, servers...).
    run_shape: tuple[str, ...] = ()

    def train_step_s(self, tokens: float) -> float:
        return max(0.0, self.step_intercept_s + self.step_s_per_token * tokens)

    def overrides_for(self, cfg: SdpConfig, latency_scale: float) -> list[str]:
        """simulate.* overrides for simulating `cfg` (its batch size sets the step time), with
        the server time (prefill and per-token latency) scaled by `latency_scale`."""
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
        lengths = ",".join(str(n) for n in self.new_tokens)
        return [
            f"simulate.prefill_s={self.prefill_s * latency_scale:.6g}",
            f"simulate.token_latency_s={self.latency_intercept_s * latency_scale:.6g}",
            f"simulate.token_latency_per_seq_s={self.latency_per_seq_s * latency_scale:.6g}",
            f"simulate.mean_new_tokens={max(1, round(self.mean_new_tokens))}",
            f"simulate.new_tokens=[{lengths}]",
            f"simulate.train_step_s={self.train_step_s(tokens):.6g}",
            f"simulate.export_s={self.export_s:.6g}",
            f"simulate.update_s={self.update_s:.6g}",
        ]


def _run_log(run_dir: Path) -> tuple[Path, list[Event], RunStartedEvent]:
    """The log's path, its events and its first run_started event."""
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        raise SdpError(f"--calibrate: no run log at {path}")
    events = list(read_events(path))
    started = [e for e in events if isinstance(e, RunStartedEvent)]
    if not started:
        raise SdpError(f"--calibrate: {path} has no run_started event")
    return path, events, started[0]


def read_calibration(run_dir: Path) -> Calibration:
    path, events, started = _run_log(run_dir)
    n_samples = started.n_samples
    times = rollout_timings(events, n_samples, started.server_count)
    steps = steady_train_steps(events)
    updates = [e for e in events if isinstance(e, WeightUpdateEvent)]
    if not times.seconds or not steps:
        raise SdpError(
            f"--calibrate: {path} has {len(times.seconds)} finished rollouts with tokens and "
            f"{len(steps)} train steps; calibration needs at least one of each"
        )
    intercept, slope = step_time_line(
        [float(e.tokens) for e in steps], [e.step_s for e in steps], fixed_step_s(steps)
    )
    # The simulator's servers prefill for simulate.prefill_s whatever the prompt: a log of
    # theirs is fitted with a prefill of its own.
    prompt_tokens = mean_prompt_tokens(events) if started.mode != "simulate" else None
    prefill, per_token, per_seq = server_time_fit(times, prompt_tokens)
    return Calibration(
        run_dir=Path(run_dir),
        n_samples=n_samples,
        rollout_token_latency_s=statistics.fmean(
            s / t for s, t in zip(times.seconds, times.tokens, strict=True)
        ),
        completion_s=statistics.fmean(times.seconds),
        prefill_s=prefill,
        latency_intercept_s=per_token,
        latency_per_seq_s=per_seq,
        mean_new_tokens=statistics.fmean(times.tokens),
        new_tokens=length_quantiles(times),
        prompt_tokens=prompt_tokens,
        step_intercept_s=intercept,
        step_s_per_token=slope,
        export_s=statistics.fmean(export_seconds(e) for e in updates) if updates else 0.0,
        update_s=statistics.fmean(rest_seconds(e) for e in updates) if updates else 0.0,
        rollouts=len(times.seconds),
        steps=len(steps),
        updates=len(updates),
        per_completion=times.per_completion,
        run_shape=run_shape(started),
    )


def steady_train_steps(events: Sequence[Event]) -> list[TrainStepEvent]:
    """The finite train steps less the first after each start or resume, when others remain:
    that one also creates the optimizer's state and warms the allocator, so it is slower than
    the rest (docs/benchmarks.md, Calibration)."""
    steps: list[TrainStepEvent] = []
    first = False
    for event in events:
        if isinstance(event, RunStartedEvent):
            first = True
        elif isinstance(event, TrainStepEvent) and not event.skipped:
            if not first:
                steps.append(event)
            first = False
    finite = [e for e in events if isinstance(e, TrainStepEvent) and not e.skipped]
    return steps or finite


# Quantiles of the completion lengths a calibration hands the simulator.
_LENGTH_QUANTILES = 20


def length_quantiles(times: CompletionTimes) -> tuple[int, ...]:
    """The completions' tokens at the middle of each of 20 equal shares of them (weighted:
    a rollout without completion times stands for its completions)."""
    ordered = sorted((tokens, weight) for _, _, tokens, weight in times.spans)
    total = sum(weight for _, weight in ordered)
    cumulative = list(itertools.accumulate(weight for _, weight in ordered))
    quantiles = []
    for i in range(_LENGTH_QUANTILES):
        at = (i + 0.5) / _LENGTH_QUANTILES * total
        index = min(bisect.bisect_left(cumulative, at), len(ordered) - 1)
        quantiles.append(max(1, round(ordered[index][0])))
    return tuple(quantiles)


def mean_prompt_tokens(events: Sequence[Event]) -> float | None:
    """Mean prompt tokens of the timed completions; None when a timed rollout lacks them (logs
    before `rollout_finished.prompt_tokens`) or none was timed."""
    lengths: list[int] = []
    for event in events:
        if isinstance(event, RolloutFinishedEvent) and event.completion_s:
            if event.prompt_tokens is None:
                return None
            lengths += event.prompt_tokens
    return statistics.fmean(lengths) if lengths else None


def export_seconds(update: WeightUpdateEvent) -> float:
    """The trainer's export in an update: the part the trainer always waits for."""
    return update.phases.get("export_s", 0.0)


def rest_seconds(update: WeightUpdateEvent) -> float:
    """The rest of an update: the reload and what goes with it, less the export and the time
    it waited for running rollouts to complete the next batch (train.overlap_reload), which
    the simulation makes by itself."""
    return update.total_s - export_seconds(update) - update.phases.get("take_next_s", 0.0)


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


@dataclass(frozen=True)
class CompletionTimes:
    """The finished completions of a log with tokens (each rollout's mean completion in logs
    without completion times), as the server-time fit reads them."""

    # (start, end, tokens, completions it stands for), as `completion_spans` gives them.
    spans: list[tuple[float, float, float, int]]
    in_flight: InFlight
    servers: int
    # Completions in flight per server just after each one started: the prompts prefilled
    # ahead of it and its own when requests arrive together (all of a step's at η = 0).
    prefills: list[float]
    # False when the spans are rollouts (submit to finish), not completions.
    per_completion: bool

    @property
    def seconds(self) -> list[float]:
        return [end - start for start, end, _, _ in self.spans]

    @property
    def tokens(self) -> list[float]:
        return [tokens for _, _, tokens, _ in self.spans]

    def decoding(self, prefill_s: float, per_token: float, per_seq: float) -> list[float]:
        """Completions in flight per server beside each one while it decodes: over its life
        after the prefills it waited for (`prefill_s` each; a burst is not decoding while its
        prompts are read), averaged over its tokens, which come faster while fewer decode
        (a token takes `per_token + per_seq · decoding`; a time average would weigh the
        crowded, slow stretches more than the tokens made in them)."""
        decode_from = [
            min(start + prefill_s * prefills, end - _TOGETHER * (end - start))
            for (start, end, _, _), prefills in zip(self.spans, self.prefills, strict=True)
        ]
        intervals = [(t, end) for t, (_, end, _, _) in zip(decode_from, self.spans, strict=True)]

        def token_rate(open_weight: int) -> float:
            latency = per_token + per_seq * open_weight / self.servers
            # Before the first fit no latency is known: every moment counts the same.
            return 1.0 / latency if latency > 0 else 1.0

        means = self.in_flight.weighted_means(intervals, token_rate)
        return [mean / self.servers for mean in means]


def rollout_timings(
    events: Sequence[Event], n_samples: int, servers: int = 1, per_completion: bool = True
) -> CompletionTimes:
    """The times of every finished completion with tokens (`per_completion=False`: of every
    rollout, as for a log without completion times)."""
    spans = completion_spans(events, n_samples, per_completion)
    in_flight = InFlight([(start, end, weight) for start, end, _, weight in spans])
    servers = max(servers, 1)
    return CompletionTimes(
        spans=spans,
        in_flight=in_flight,
        servers=servers,
        prefills=[
            in_flight.open_after(start + _TOGETHER * (end - start)) / servers
            for start, end, _, _ in spans
        ],
        per_completion=per_completion and all(weight == 1 for *_, weight in spans),
    )


def completion_spans(
    events: Sequence[Event], n_samples: int, per_completion: bool = True
) -> list[tuple[float, float, float, int]]:
    """(start, end, tokens, completions it stands for) of every finished completion with tokens:
    one per completion when the log has `completion_s` (and `per_completion`), else one per
    rollout (submit to finish, its tokens per completion, standing for its `n_samples`
    completions)."""
    submitted = {
        e.rollout_id: e.ts
        for e in events
        if isinstance(e, RolloutSubmittedEvent) and e.ts is not None
    }
    spans: list[tuple[float, float, float, int]] = []
    for event in events:
        if not isinstance(event, RolloutFinishedEvent) or event.n_tokens <= 0 or event.ts is None:
            continue
        if per_completion and event.completion_s and event.completion_tokens:
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
            tokens_each = event.n_tokens / max(n_samples, 1)
            spans.append((start, event.ts, tokens_each, max(n_samples, 1)))
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
        # Weight open just after each change.
        self._open = list(itertools.accumulate(delta for _, delta in changes))
        self._area = self._integrals(float)

    def _integrals(self, value: Callable[[int], float]) -> list[float]:
        """∫ value(weight open) dt from the first change up to each change."""
        areas, area = [], 0.0
        for i, t in enumerate(self._times):
            if i > 0:
                area += value(self._open[i - 1]) * (t - self._times[i - 1])
            areas.append(area)
        return areas

    def _integral_at(
        self, areas: Sequence[float], value: Callable[[int], float], t: float
    ) -> float:
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0:
            return 0.0
        return areas[i] + value(self._open[i]) * (t - self._times[i])

    def mean(self, start: float, end: float) -> float:
        before = self._integral_at(self._area, float, start)
        return (self._integral_at(self._area, float, end) - before) / (end - start)

    def weighted_means(
        self, intervals: Sequence[tuple[float, float]], weight: Callable[[int], float]
    ) -> list[float]:
        """The mean weight open over each [start, end), each moment counted `weight(weight
        open)` times."""

        def weighted_open(open_weight: int) -> float:
            return open_weight * weight(open_weight)

        numerators = self._integrals(weighted_open)
        denominators = self._integrals(weight)
        means = []
        for start, end in intervals:
            numerator = self._integral_at(numerators, weighted_open, end)
            numerator -= self._integral_at(numerators, weighted_open, start)
            denominator = self._integral_at(denominators, weight, end)
            denominator -= self._integral_at(denominators, weight, start)
            means.append(numerator / denominator if denominator > 0 else self.mean(start, end))
        return means

    def open_after(self, t: float) -> int:
        """Weight open just after `t`: intervals starting at `t` in, those ending at `t` out."""
        i = bisect.bisect_right(self._times, t) - 1
        return self._open[i] if i >= 0 else 0


def server_time_fit(
    times: CompletionTimes, prompt_tokens: float | None = None
) -> tuple[float, float, float]:
    """(prefill_s, a, b) of seconds ≈ prefill_s·k + tokens·(a + b·c), none negative (k: the
    prefills it waited for, c: completions decoding per server beside it); with
    `prompt_tokens`, prefill_s = b · prompt_tokens (see `nonnegative_fit`).

    c depends on the fit (a completion decodes after its prefills, and its tokens come faster
    while fewer decode), so the fit is repeated with the c of the previous round's values,
    each round going half way to its fit (the plain iteration swings about the answer)."""
    fitted = nonnegative_fit(times, times.decoding(0.0, 0.0, 0.0), prompt_tokens)
    damped = fitted
    for _ in range(_FIT_ROUNDS):
        fitted = nonnegative_fit(times, times.decoding(*damped), prompt_tokens)
        prefill, per_token, per_seq = ((d + f) / 2 for d, f in zip(damped, fitted, strict=True))
        damped = (prefill, per_token, per_seq)
    return fitted


def nonnegative_fit(
    times: CompletionTimes, decoding: Sequence[float], prompt_tokens: float | None = None
) -> tuple[float, float, float]:
    """(prefill_s, a, b) of seconds ≈ prefill_s·k + tokens·(a + b·c) with c = `decoding`,
    none negative.

    With `prompt_tokens` (a vLLM log), prefill_s = b · prompt_tokens: a vLLM engine step costs
    about a + b per token it computes, a decoding sequence's or a prompt's alike, so a
    prompt's prefill costs b per token of it. At one batch size a log cannot tell a from b
    (every completion decodes beside about as many), and a free prefill let the fit of one
    batch size disagree with another's on b (docs/benchmarks.md, Calibration); the prompts tie
    b to the prefill, which the burst at the start of every step shows plainly."""
    import numpy as np  # only here: `sdp` starts without numpy

    tokens = np.asarray(times.tokens, dtype=float)
    crowded = tokens * np.asarray(decoding, dtype=float)
    prefills = np.asarray(times.prefills, dtype=float)
    # Columns in the order ties prefer them: per token, per token and sequence, prefill.
    if prompt_tokens is None:
        columns = np.column_stack([tokens, crowded, prefills])
    else:
        columns = np.column_stack([tokens, crowded + prompt_tokens * prefills])
    coefficients = nonnegative_least_squares(columns, np.asarray(times.seconds, dtype=float))
    if prompt_tokens is None:
        per_token, per_seq, prefill = coefficients
    else:
        per_token, per_seq = coefficients
        prefill = per_seq * prompt_tokens
    return prefill, per_token, per_seq


def nonnegative_least_squares(columns: Any, values: Any) -> list[float]:
    """The least squares of `values` over `columns` with no coefficient below 0: the best fit
    of every subset of the columns whose coefficients are all ≥ 0 (a run shows a narrow range
    of batch sizes, so a free fit can trade one term for a negative other). Fewer columns,
    then earlier ones, win ties."""
    import numpy as np

    n_terms = columns.shape[1]
    best = np.zeros(n_terms)
    best_residual = float(values @ values)
    for subset in _term_subsets(n_terms):
        coefficients = np.zeros(n_terms)
        coefficients[subset] = np.linalg.lstsq(columns[:, subset], values, rcond=None)[0]
        residual = float(np.sum((columns @ coefficients - values) ** 2))
        if np.all(coefficients >= 0) and residual < best_residual * (1 - 1e-12):
            best, best_residual = coefficients, residual
    return [float(v) for v in best]


def _term_subsets(n_terms: int) -> list[list[int]]:
    """The non-empty subsets of `n_terms` terms, smallest first."""
    masks = range(1, 2**n_terms)
    subsets = [[i for i in range(n_terms) if mask >> i & 1] for mask in masks]
    return sorted(subsets, key=len)


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); a flat line at the mean when x does not vary."""
    if len(xs) < 2 or statistics.pvariance(xs) == 0:
        return statistics.fmean(ys), 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


# Below this ratio of the most to the fewest tokens trained in a step, the run had one batch
# size and the noise of its step times sets the line's slope.
_WIDE_TOKEN_RANGE = 1.5


def fixed_step_s(steps: Sequence[TrainStepEvent]) -> float:
    """The mean seconds of a step that do not grow with its tokens (the optimizer step, which
    the trainer logs as `optimizer_s`); 0 for logs without it."""
    fixed = [e.stats.get("optimizer_s") for e in steps]
    present = [seconds for seconds in fixed if seconds is not None]
    return statistics.fmean(present) if present and len(present) == len(fixed) else 0.0


def step_time_line(
    tokens: Sequence[float], seconds: Sequence[float], fixed: float = 0.0
) -> tuple[float, float]:
    """(intercept, slope) of the train step's seconds in its tokens, `fixed` of every step's
    seconds known not to grow with them.

    Steps that all took the same time (a simulated trainer) give that flat line. A run at one
    batch size trains nearly the same tokens every step: a least-squares slope there is noise
    (it can even be negative: docs/benchmarks.md, Calibration), so the
    rest of the step time is taken as proportional to the tokens, which is what the compute of
    a forward and backward pass is. Wider ranges get the least-squares line, `fixed` plus the
    proportional rest again where that line has a negative slope or intercept."""
    if max(seconds) - min(seconds) <= 1e-9 * max(seconds):
        return seconds[0], 0.0
    growing = [max(s - fixed, 0.0) for s in seconds]
    slope = sum(s * t for s, t in zip(growing, tokens, strict=True)) / sum(t * t for t in tokens)
    if max(tokens) < _WIDE_TOKEN_RANGE * min(tokens):
        return fixed, slope
    intercept, fitted_slope = line_fit(tokens, seconds)
    return (fixed, slope) if fitted_slope <= 0 or intercept < 0 else (intercept, fitted_slope)


def mean_completion_s(run_dir: Path, per_completion: bool = True) -> float:
    """The mean seconds of a log's completions, read as `read_calibration` reads them
    (`per_completion=False`: one span per rollout even where the log timed each completion, to
    compare a simulated log with an older one), without fitting anything."""
    _, events, started = _run_log(run_dir)
    seconds = rollout_timings(events, started.n_samples, started.server_count, per_completion)
    return statistics.fmean(seconds.seconds) if seconds.seconds else 0.0


def calibrated_latency_scale(
    calibration: Calibration,
    load_run_config: Callable[[list[str]], SdpConfig],
    simulate_log: Callable[[SdpConfig, Path], None],
    scratch: Path,
) -> float:
    """The factor on the server time (prefill and per-token latency) with which the simulated
    run shows the run's measured mean completion seconds.

    `load_run_config(overrides)`: the calibrated run's own shape plus `overrides`;
    `simulate_log(cfg, path)`: simulate `cfg` writing its log to `path`."""
    target = calibration.completion_s
    scale = 1.0
    for round_index in range(_LATENCY_ROUNDS):
        cfg = load_run_config(calibration.overrides_for_run(scale))
        log = scratch / f"round-{round_index}" / "events.jsonl"
        simulate_log(cfg, log)
        # Read as the calibrated log was: one span per rollout when it had no completion times.
        simulated = mean_completion_s(log.parent, calibration.per_completion)
        if simulated <= 0:
            break
        scale *= target / simulated
    return scale


def simulate_to_log(cfg: SdpConfig, path: Path) -> None:
    from sdp_cli.simulate.run import run_simulation

    path.parent.mkdir(parents=True, exist_ok=True)
    with EventLog(path) as events:
        run_simulation(cfg, events)
