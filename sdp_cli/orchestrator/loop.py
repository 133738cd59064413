"""The training loop: take B rollouts → one training step → the weight-update protocol → repeat.

The protocol itself is `weight_sync.sequence.WeightUpdate`, shared with `sdp simulate`; the loop
plugs in the actor's weight export (run on a worker thread, so the servers score while it writes)
and the servers' transport it was given, so it knows nothing of how they run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sdp_cli.common.faults import hold_point
from sdp_cli.config.run_plan import RunPlan
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import UpdateMode
from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import EventSink
from sdp_cli.events.event_schema import (
    CheckpointEvent,
    CurriculumEvent,
    EvalEvent,
    TrainStepEvent,
)
from sdp_cli.events.health_fields import split_health
from sdp_cli.orchestrator.evaluate import Evaluator
from sdp_cli.orchestrator.run_state import TrainState, checkpoint_due
from sdp_cli.orchestrator.sample_log import SampleLog
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.positions import PositionState
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.tasks.levels import Schedule
from sdp_cli.weight_sync.sequence import WeightUpdate
from sdp_cli.weight_sync.transport import WeightTransport
from sdp_cli.weight_sync.versions import weights_dir_for

# Which data positions are trained so far (for checkpoints).
DataPositionState = Callable[[], PositionState]


class Trainer(Protocol):
    """What the loop asks of the torch trainer (`trainer.actor.Actor` and its FSDP2 variant);
    the loop itself imports no torch, so `sdp simulate` and tests can run it with fakes."""

    def train_step(self, groups: Sequence[RolloutGroup], version: int) -> dict[str, float]: ...

    def score(
        self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
    ) -> list[list[float]]: ...

    def export_weights(self, weights_dir: Path, version: int, dtype: str) -> Path:
        """Write `weights_dir/v{version}/` in the servers' dtype (vLLM's --dtype name)."""
        ...

    def save_checkpoint(self, run_dir: Path, state: TrainState, keep: int | None) -> Path: ...


@dataclass
class LoopResult:
    steps: int
    version: int
    rewards: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def trained_tokens(groups: list[RolloutGroup]) -> int:
    """Tokens the models sampled (an episode's context tokens are not generated)."""
    return sum(s.n_trained for g in groups for s in g.samples)


class NonFiniteTrainingError(SdpError):
    """Too many training steps in a row had a loss or gradient norm that was not finite."""


class TrainingLoop:
    def __init__(
        self,
        cfg: SdpConfig,
        actor: Trainer,
        executor: RolloutExecutor,
        servers: WeightTransport,
        events: EventSink,
        data_positions: DataPositionState,
        start: TrainState,
        plan: RunPlan,
        evaluator: Evaluator | None = None,
        samples: SampleLog | None = None,
        curriculum: Schedule | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.weights_dir = weights_dir_for(cfg.train.weights_dir, self.run_dir)
        self.plan = plan
        self.recompute_on_trainer = plan.recompute_on_trainer
        self.actor = actor
        self.executor = executor
        self.events = events
        self.weight_update = WeightUpdate(
            executor,
            servers,
            self.export_weights,
            plan.proximal_recompute,
            events,
            settle_timeout_s=cfg.train.update_timeout_s,
            keep_requests=cfg.train.update_mode == UpdateMode.keep,
        )
        self.data_positions = data_positions
        self.step = start.step
        self.version = start.version
        self.evaluator = evaluator
        self.samples = samples
        # task.curriculum: the level schedule the task's training prompts follow.
        self.curriculum = curriculum
        self.rewards: list[float] = []
        # The next step's batch, when the last update took it before its reload.
        self.next_batch: list[RolloutGroup] | None = None
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0

    def run(self) -> LoopResult:
        started = time.monotonic()
        self.announce_curriculum()
        # A baseline before the first step (or where a resumed run left off).
        self.evaluate_if_due()
        try:
            while self.step < self.cfg.train.steps:
                self.run_step()
                self.evaluate_if_due()
        finally:
            # No reload left running behind the caller's back, even when a step raised.
            self.finish_update()
        return LoopResult(self.step, self.version, self.rewards, time.monotonic() - started)

    def run_step(self) -> None:
        index = self.step
        wait_started = time.monotonic()
        hold_point("generation")
        groups, self.next_batch = self.next_batch, None
        if groups is None:
            groups = self.executor.take(
                self.cfg.rollout.batch_size, self.cfg.rollout.take_timeout_s, step=index
            )
        wait_s = time.monotonic() - wait_started
        recompute_s, recomputed = self.score_proximal_on_trainer()
        stats = self.actor.train_step(groups, self.version)
        if recomputed:
            # The trainer's scoring is part of its step.
            stats["step_time_s"] += recompute_s
            stats["trainer_recompute_s"] = recompute_s
            stats["trainer_recompute_samples"] = float(recomputed)
        if self.samples is not None:
            self.samples.trained(index, self.version, groups)
        self.count_skipped(stats)
        trained_version = self.version
        phases = self.update_weights(self.version + 1, take_next=self.takes_next_batch(index + 1))
        self.version += 1
        self.step += 1
        self.rewards.append(stats["reward_mean"])
        self.advance_curriculum(stats["reward_mean"])
        self.emit_train_step(index, groups, stats, trained_version, wait_s, phases)
        self.stop_if_not_finite()
        if checkpoint_due(self.step, self.cfg.train.checkpoint_every):
            self.save_checkpoint()

    def announce_curriculum(self) -> None:
        """The level the run starts (or resumes) at, so the log holds every level in force."""
        if self.curriculum is None:
            return
        last = self.curriculum.state().changes[-1]
        self.events.emit(
            CurriculumEvent(
                step=self.step,
                position=last.position,
                level=last.level,
                reason="start" if self.step == 0 else "resume",
            )
        )

    def advance_curriculum(self, reward: float) -> None:
        """Raise the curriculum's level when its rule says so: the positions handed out from
        now on get the new level."""
        if self.curriculum is None:
            return
        change = self.curriculum.after_step(self.step, reward, self.data_positions().next_position)
        if change is not None:
            self.events.emit(
                CurriculumEvent(
                    step=change.step,
                    position=change.position,
                    level=change.level,
                    reason=self.curriculum.cfg.mode,
                )
            )

    def score_proximal_on_trainer(self) -> tuple[float, int]:
        """rollout.recompute_on=trainer: score the buffered version−1 tokens with the
        trainer's weights, which are still this version's before its optimizer step; the
        servers score at the update only what finishes meanwhile. Returns the seconds and the
        samples scored."""
        if not self.recompute_on_trainer:
            return 0.0, 0
        started = time.monotonic()
        jobs = self.executor.run_sync(self.executor.proximal_jobs_async(self.version))
        if not jobs:
            return 0.0, 0
        scores = self.actor.score(
            [sample.prompt_ids for sample, _ in jobs], [sample.output_ids for sample, _ in jobs]
        )
        self.executor.run_sync(self.executor.keep_proximal_async(jobs, scores, self.version))
        return time.monotonic() - started, len(jobs)

    def evaluate_if_due(self) -> None:
        """Evaluate the weights the servers hold now, between two weight updates, so every
        evaluation completion comes from the one version reported."""
        if self.evaluator is None or not self.evaluator.due(self.step):
            return
        self.finish_update()
        result = self.executor.run_sync(self.evaluator.run())
        self.events.emit(
            EvalEvent(
                step=self.step,
                version=self.version,
                accuracy=result.accuracy,
                pass_at_k=result.pass_at_k,
                k=result.k,
                mean_reward=result.mean_reward,
                n_prompts=result.n_prompts,
                temperature=self.evaluator.settings.temperature,
                seconds=result.seconds,
            )
        )
        if self.samples is not None:
            self.samples.evaluated(self.step, self.version, result.completions)

    def count_skipped(self, stats: dict[str, float]) -> None:
        if stats.get("skipped"):
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0

    def stop_if_not_finite(self) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTrainingError(
                f"the loss or gradient norm was not finite in {self.nonfinite_in_a_row} "
                f"training steps in a row (each was skipped; train.max_nonfinite_steps="
                f"{limit}); lower train.lr, or bound the behaviour weights with "
                "train.behav_weight_cap"
            )

    async def export_weights(self, version: int) -> Path:
        """Write weights/v{version}/ on a worker thread while the loop serves the recompute."""
        return await asyncio.to_thread(
            self.actor.export_weights, self.weights_dir, version, self.cfg.server.dtype
        )

    def takes_next_batch(self, next_step: int) -> bool:
        """Whether the update before `next_step` may take its batch early (train.overlap_reload).
        Not before the end, where the batch would never be trained, nor before a checkpoint,
        which must not count a batch taken but not trained as done; nor when the trainer scores
        the proximal recompute, which it does at the executor's version, after the reload."""
        return (
            self.plan.overlaps_reload
            and not self.recompute_on_trainer
            and next_step < self.cfg.train.steps
            and not checkpoint_due(next_step, self.cfg.train.checkpoint_every)
        )

    def update_weights(self, new_version: int, take_next: bool = False) -> dict[str, float]:
        """The weight-update protocol; returns the time of each phase so far and the seconds
        the trainer waited for it (`wait_s`). With `take_next`, the next step's batch may come
        back in `self.next_batch` while the servers still reload."""
        result = self.executor.run_sync(
            self.weight_update.run(
                new_version - 1,
                take_next=self.cfg.rollout.batch_size if take_next else 0,
                step=self.step + 1,
            )
        )
        self.next_batch = result.next_batch
        return {**result.phases, "wait_s": result.trainer_wait_s}

    def finish_update(self) -> None:
        """Wait for the reload an update left running (raises what it raised)."""
        self.executor.run_sync(self.weight_update.finished())

    def emit_train_step(
        self,
        index: int,
        groups: list[RolloutGroup],
        stats: dict[str, float],
        trained_version: int,
        wait_s: float,
        phases: dict[str, float],
    ) -> None:
        step_s = stats["step_time_s"]
        samples = sum(len(g.samples) for g in groups)
        tokens = trained_tokens(groups)
        cycle_s = wait_s + step_s + phases["wait_s"]
        # The health figures get typed fields of their own, not a second copy in `stats`.
        stats, health, health_by_lag = split_health(stats)
        self.events.emit(
            TrainStepEvent(
                # 0-based index of the step; with no resume it equals the version trained.
                step=index,
                version=trained_version,
                reward=stats["reward_mean"],
                loss=stats.get("loss"),
                clip_frac=stats.get("clip_frac"),
                behav_weight_mean=stats.get("behav_weight_mean"),
                behav_weight_max=stats.get("behav_weight_max"),
                masked_frac=stats.get("masked_frac"),
                grad_norm=stats.get("grad_norm"),
                entropy=stats.get("entropy"),
                kl=stats.get("kl"),
                lr=stats.get("lr"),
                ref_kl=stats.get("ref_kl") if self.cfg.train.kl_coef > 0 else None,
                # The loss or gradient norm was not finite: the weights were left as they were.
                skipped=bool(stats.get("skipped")),
                skipped_steps=self.skipped_steps,
                stats=stats,
                health=health,
                health_by_lag=health_by_lag,
                rollouts=len(groups),
                rollout_ids=[g.rollout_id for g in groups],
                # Data positions identify a sample across a resume (rollout ids restart at v·B).
                positions=[g.meta.get("position") for g in groups],
                samples=samples,
                tokens=tokens,
                wait_s=wait_s,
                step_s=step_s,
                # The trainer's wait: with a batch taken early, the reload is not in it.
                update_s=phases["wait_s"],
                samples_per_s=samples / cycle_s if cycle_s > 0 else 0.0,
                gen_tokens_per_s=tokens / cycle_s if cycle_s > 0 else 0.0,
                curriculum_level=None if self.curriculum is None else self.curriculum.level,
            )
        )

    def save_checkpoint(self) -> Path:
        # Taken between steps: every position of the steps so far is trained, and the ones
        # handed out since are in the untrained list, to be replayed after a resume.
        positions = self.data_positions()
        state = TrainState(
            step=self.step,
            version=self.version,
            data_position=positions.next_position,
            untrained_positions=positions.untrained,
            curriculum=None if self.curriculum is None else self.curriculum.state().to_json(),
        )
        path = self.actor.save_checkpoint(self.run_dir, state, self.cfg.train.keep_checkpoints)
        self.events.emit(CheckpointEvent(step=self.step, version=self.version, path=str(path)))
        return path
