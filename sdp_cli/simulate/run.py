"""`sdp simulate`: the real executor, manager and strategy against simulated servers and a
simulated trainer, for capacity planning."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable
from functools import reduce
from typing import Any

from sdp_cli.config.run_plan import plan_run
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import UpdateMode
from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import EventSink
from sdp_cli.events.event_schema import Event, RunFinishedEvent
from sdp_cli.orchestrator.run_started import run_started_event
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.simulate.clock import SimTime, VirtualTimeLoop
from sdp_cli.simulate.proximal_check import ProximalCheck
from sdp_cli.simulate.sim_server import SimulatedFleet
from sdp_cli.simulate.trainer import SimulatedTrainer, TrainerReport
from sdp_cli.simulate.workflow import SimulatedEpisodes, SimulatedWorkflow


def run_simulation(
    cfg: SdpConfig, events: EventSink | None = None, *, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run train.steps simulated steps; returns the summary `sdp simulate --json` prints.

    With `events`, the simulation writes the run log `sdp train` writes (same schema), stamped
    in simulated time, so the dashboard and `sdp inspect-staleness` read it like a real run.
    With `timeout_s`, a run still going after that many wall-clock seconds is cancelled and
    TimeoutError raised (a stuck virtual clock spins without ever reaching a take's timeout)."""
    sim = cfg.simulate
    rng = random.Random(sim.seed)
    sim_time = SimTime(sim.time_scale)
    plan = plan_run(cfg)
    if events is not None:
        events = SimulatedTimeSink(events, sim_time)
        events.emit(run_started_event(cfg, plan, mode="simulate"))
    pool = SimulatedFleet(cfg.server.count, sim, rng, sim_time, events)
    pool.keep_requests = cfg.train.update_mode == UpdateMode.keep
    pool.report_states()
    workflow = SimulatedWorkflow(
        pool,
        cfg.rollout.n_samples,
        sim.mean_new_tokens,
        rng,
        sim.new_tokens,
        # As the inference client: prompt logprobs are of T = 1 only.
        score_continuations=plan.scores_continuations and cfg.rollout.temperature == 1.0,
        uninformative_fraction=sim.uninformative_fraction,
        episodes=SimulatedEpisodes(
            sim.turns, sim.env_latency_s, sim.env_tokens, sim.latency_jitter
        ),
    )
    executor = RolloutExecutor(
        workflow,
        cfg.rollout,
        cfg.train.prox_mode,
        events=events,
        scorer=pool.score_many,
        loop_factory=VirtualTimeLoop if sim_time.virtual else asyncio.new_event_loop,
    )
    workflow.executor_version = lambda: executor.accepts_at_version
    check = ProximalCheck(cfg.train.prox_mode)
    trainer = SimulatedTrainer(executor, pool, cfg, plan, sim_time, check, events)
    wall_started = time.perf_counter()
    cpu_started = time.process_time()
    # Started paused: in virtual time nothing may happen before the trainer is on the loop.
    executor.start(paused=True)
    try:
        report = executor.run_sync(trainer.run(), timeout_s)
    finally:
        executor.stop()
    wall_s = time.perf_counter() - wall_started
    cpu_s = time.process_time() - cpu_started
    if events is not None:
        events.emit(
            RunFinishedEvent(
                steps=report.steps, version=report.snapshot["version"], wall_s=report.elapsed_s
            )
        )
    return simulation_result(cfg, report, wall_s=wall_s, cpu_s=cpu_s)


class SimulatedTimeSink:
    """Stamps each event with the simulated time it happened at (as Unix seconds from the
    simulation's wall-clock start), so durations read from the log are simulated seconds.
    Events from outside the loop (before it starts, after it stops) get the last time seen."""

    def __init__(self, inner: EventSink, sim_time: SimTime) -> None:
        self._inner = inner
        self._time = sim_time
        self._origin = time.time()
        self._sim_start: float | None = None
        self._last = 0.0

    def emit(self, event: Event) -> None:
        self._inner.emit(dataclasses.replace(event, ts=self._origin + self._elapsed()))

    def _elapsed(self) -> float:
        try:
            now = self._time.now()
        except RuntimeError:  # no running loop: not on the simulation's loop
            return self._last
        if self._sim_start is None:
            self._sim_start = now
        self._last = now - self._sim_start
        return self._last


def simulation_result(
    cfg: SdpConfig, report: TrainerReport, *, wall_s: float, cpu_s: float
) -> dict[str, Any]:
    snap = report.snapshot
    elapsed = report.elapsed_s
    submitted = snap["submitted"]
    return {
        "strategy": cfg.rollout.strategy.value,
        "max_staleness": cfg.rollout.max_staleness,
        "batch_size": cfg.rollout.batch_size,
        "max_concurrent": cfg.rollout.max_concurrent,
        "n_samples": cfg.rollout.n_samples,
        "servers": cfg.server.count,
        "prox_mode": cfg.train.prox_mode.value,
        "steps": report.steps,
        "versions": snap["version"],
        "rollouts_submitted": submitted,
        "accepted": snap["accepted_total"],
        "accepted_live": snap["accepted_live"],
        "rejected": snap["rejected"],
        "dropped": dict(sorted(snap["dropped"].items())),
        "dropped_total": snap["dropped_total"],
        "consumed": snap["consumed"],
        "running_at_end": snap["running"],
        "buffered_at_end": snap["queue_size"],
        "max_trained_lag": max(report.lag_histogram, default=0),
        "lag_histogram": {str(lag): n for lag, n in sorted(report.lag_histogram.items())},
        "tokens_by_lag": {str(lag): n for lag, n in sorted(report.tokens_by_lag.items())},
        "trainer_idle_fraction": _fraction(report.waiting_s, elapsed),
        "generator_idle_fraction": round(report.generator_idle_fraction, 4),
        "samples_per_s": _rate(report.trained_rollouts, elapsed),
        "tokens_per_s": _rate(report.trained_tokens, elapsed),
        "tokens_generated": report.tokens_generated,
        "segments_aborted": report.segments_aborted,
        "recomputed_tokens": report.recompute_tokens,
        "recompute_failures": report.recompute_failures,
        "recompute_missed": report.recompute_missed,
        # Trained tokens whose p_t is not the rule's (simulate/proximal_check.py).
        **report.proximal,
        "sim_time_s": round(elapsed, 6),
        "wall_s": round(wall_s, 4),
        "cpu_us_per_rollout": round(cpu_s / submitted * 1e6, 1) if submitted else None,
    }


def _fraction(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def _rate(count: float, seconds: float) -> float | None:
    """Per simulated second; None when no simulated time passed (all latencies zero)."""
    return round(count / seconds, 3) if seconds > 0 else None


# ---- sweeps ---------------------------------------------------------------------------------


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` → (KEY, [V1, V2, ...])."""
    key, sep, values_text = spec.partition("=")
    values = [v.strip() for v in values_text.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise SdpError(f"--sweep expects KEY=V1,V2,... (got '{spec}')")
    return key.strip(), values


def config_value(cfg: SdpConfig, key: str) -> Any:
    value = reduce(getattr, key.split("."), cfg)
    return getattr(value, "value", value)


def run_sweep(
    load: Callable[[list[str]], SdpConfig], key: str, values: list[str]
) -> list[dict[str, Any]]:
    """One simulation per value of `key`. Every config is loaded (and validated) first, so a
    bad value fails before anything runs."""
    configs = [load([f"{key}={value}"]) for value in values]
    rows = []
    for cfg in configs:
        rows.append({"sweep": {key: config_value(cfg, key)}, **run_simulation(cfg)})
    return rows
