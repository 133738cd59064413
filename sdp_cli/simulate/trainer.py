"""The simulated trainer: takes B rollouts, "trains" for train_step_s, then runs the
weight-update protocol `sdp train` runs (weight_sync/sequence.py) with a simulated export
against the executor and the simulated servers.

It runs as a coroutine on the executor's own loop (awaiting the executor's `*_async` methods),
so in virtual time the whole simulation lives on one deterministic clock. Every batch it trains
goes through the proximal check (simulate/proximal_check.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdp_cli.config.run_plan import RunPlan
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import UpdateMode
from sdp_cli.events.event_log import EventSink, NullEventLog
from sdp_cli.events.event_schema import TrainStepEvent
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.simulate.clock import SimTime
from sdp_cli.simulate.proximal_check import ProximalCheck
from sdp_cli.simulate.sim_server import SimulatedFleet
from sdp_cli.weight_sync.sequence import UpdateResult, WeightUpdate


@dataclass
class TrainerReport:
    steps: int = 0
    trained_rollouts: int = 0
    trained_tokens: int = 0
    # Training version − head version of each trained rollout.
    lag_histogram: Counter[int] = field(default_factory=Counter)
    tokens_by_lag: Counter[int] = field(default_factory=Counter)
    waiting_s: float = 0.0
    recompute_tokens: int = 0
    recompute_failures: int = 0
    # Samples that needed the proximal recompute at an update and did not get it.
    recompute_missed: int = 0
    # The proximal check's counts and first violations (ProximalCheck.summary).
    proximal: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    generator_idle_fraction: float = 0.0
    tokens_generated: int = 0
    segments_aborted: int = 0
    # The executor's counters at the moment the last step finished.
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def elapsed_s(self) -> float:
        return self.finished_at - self.started_at


class SimulatedTrainer:
    def __init__(
        self,
        executor: RolloutExecutor,
        pool: SimulatedFleet,
        cfg: SdpConfig,
        plan: RunPlan,
        time: SimTime,
        check: ProximalCheck,
        events: EventSink | None = None,
    ) -> None:
        self._executor = executor
        self._check = check
        self._pool = pool
        self._time = time
        self._events: EventSink = events if events is not None else NullEventLog()
        self._steps = cfg.train.steps
        self._batch_size = cfg.rollout.batch_size
        self._take_timeout_s = cfg.rollout.take_timeout_s
        self._train_step_s = cfg.simulate.train_step_s
        self._export_s = cfg.simulate.export_s
        # As the training loop decides it (orchestrator/loop.py), without checkpoints here.
        self._overlap_reload = plan.overlaps_reload
        self._weight_update = WeightUpdate(
            executor,
            pool,
            self._simulated_export,
            plan.proximal_recompute,
            events if events is not None else NullEventLog(),
            settle_timeout_s=time.loop_seconds(cfg.train.update_timeout_s),
            abort_every_s=time.loop_seconds(1.0),
            keep_requests=cfg.train.update_mode == UpdateMode.keep,
        )

    async def run(self) -> TrainerReport:
        report = TrainerReport(started_at=self._time.now())
        await self._executor.resume_async()
        version = self._executor.version
        next_batch: list[RolloutGroup] | None = None
        # The last update, whose recompute may still run: one that hands the next batch over
        # recomputes after it returns, and is done once the next update (or finished()) begins.
        last_update: UpdateResult | None = None
        for step in range(self._steps):
            waited_from = self._time.now()
            batch = next_batch if next_batch is not None else await self._take(report, step)
            wait_s = self._time.now() - waited_from
            self._record_batch(report, batch, version)
            self._check.check(batch, version, step)
            await self._time.sleep(self._train_step_s)
            update_started = self._time.now()
            take_next = self._overlap_reload and step + 1 < self._steps
            result = await self._weight_update.run(
                version, take_next=self._batch_size if take_next else 0, step=step + 1
            )
            next_batch = result.next_batch
            if last_update is not None:
                self._count_recompute(report, last_update)
            last_update = result
            update_s = self._time.now() - update_started
            self._emit_train_step(step, version, batch, wait_s, update_s)
            report.steps += 1
            version += 1
        await self._weight_update.finished()
        if last_update is not None:
            self._count_recompute(report, last_update)
        # Pause and read everything here, on the loop, so the numbers do not depend on how
        # long the caller's thread takes to notice the end.
        await self._executor.pause_async()
        report.finished_at = self._time.now()
        report.snapshot = self._executor.snapshot()
        report.recompute_missed = report.snapshot["recompute_missed"]
        report.proximal = self._check.summary()
        report.generator_idle_fraction = self._pool.idle_fraction(
            report.started_at, report.finished_at
        )
        report.tokens_generated = self._pool.tokens_out
        report.segments_aborted = self._pool.aborted
        return report

    @staticmethod
    def _count_recompute(report: TrainerReport, update: UpdateResult) -> None:
        if update.recompute is not None:
            report.recompute_tokens += update.recompute.tokens
            report.recompute_failures += update.recompute.failures

    def _emit_train_step(
        self, step: int, version: int, batch: list[RolloutGroup], wait_s: float, update_s: float
    ) -> None:
        samples = [sample for group in batch for sample in group.samples]
        tokens = sum(sample.n_trained for sample in samples)
        cycle_s = wait_s + self._train_step_s + update_s
        self._events.emit(
            TrainStepEvent(
                step=step,
                version=version,
                reward=sum(s.reward for s in samples) / len(samples) if samples else None,
                rollouts=len(batch),
                rollout_ids=[group.rollout_id for group in batch],
                samples=len(samples),
                tokens=tokens,
                wait_s=wait_s,
                step_s=self._train_step_s,
                update_s=update_s,
                samples_per_s=len(samples) / cycle_s if cycle_s > 0 else None,
                gen_tokens_per_s=tokens / cycle_s if cycle_s > 0 else None,
            )
        )

    async def _simulated_export(self, version: int) -> Path | None:
        """Simulated weights are a version number; writing them takes simulate.export_s."""
        if self._export_s > 0:
            await self._time.sleep(self._export_s)
        return None

    async def _take(self, report: TrainerReport, step: int) -> list[RolloutGroup]:
        waited_from = self._time.now()
        batch = await self._executor.take_async(
            self._batch_size, timeout=self._time.loop_seconds(self._take_timeout_s), step=step
        )
        report.waiting_s += self._time.now() - waited_from
        return batch

    def _record_batch(self, report: TrainerReport, batch: list[RolloutGroup], version: int) -> None:
        for group in batch:
            report.trained_rollouts += 1
            report.lag_histogram[group.head_lag(version)] += 1
            for lag, count in group.tokens_by_lag(version).items():
                report.tokens_by_lag[lag] += count
                report.trained_tokens += count
