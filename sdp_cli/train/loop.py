"""The training loop: take B rollouts → one training step → the weight-update protocol → repeat.

The loop owns the order of the protocol (DESIGN §5): pause the executor, recompute proximal
logprobs while the servers still hold version v (segment mode) and meanwhile export v+1
atomically, have the servers reload it once both are done, move the executor to v+1 (which
purges the queue) and resume. Everything it needs from the servers comes in as one callable,
so the loop knows nothing of how they run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdp_cli.config.schema import ProxMode, SdpConfig
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.telemetry.events import EventSink
from sdp_cli.train.actor import Actor
from sdp_cli.train.checkpoint import TrainState, checkpoint_due, save_checkpoint

# Reload `weights_dir` as `version` on every server; returns the time of each phase in seconds.
ServerUpdate = Callable[[Path, int], dict[str, float]]
# The next unused data position of the task's prompt stream (for checkpoints).
DataPosition = Callable[[], int]


@dataclass
class LoopResult:
    steps: int
    version: int
    rewards: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def trained_tokens(groups: list[RolloutGroup]) -> int:
    return sum(len(s.output_ids) for g in groups for s in g.samples)


class TrainingLoop:
    def __init__(
        self,
        cfg: SdpConfig,
        actor: Actor,
        executor: RolloutExecutor,
        update_servers: ServerUpdate,
        events: EventSink,
        data_position: DataPosition,
        start: TrainState,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.actor = actor
        self.executor = executor
        self.update_servers = update_servers
        self.events = events
        self.data_position = data_position
        self.step = start.step
        self.version = start.version
        self.rewards: list[float] = []

    def run(self) -> LoopResult:
        started = time.monotonic()
        while self.step < self.cfg.train.steps:
            self.run_step()
        return LoopResult(self.step, self.version, self.rewards, time.monotonic() - started)

    def run_step(self) -> None:
        index = self.step
        wait_started = time.monotonic()
        groups = self.executor.take(self.cfg.rollout.batch_size, self.cfg.rollout.take_timeout_s)
        wait_s = time.monotonic() - wait_started
        stats = self.actor.train_step(groups, self.version)
        trained_version = self.version
        phases = self.update_weights(self.version + 1)
        self.version += 1
        self.step += 1
        self.rewards.append(stats["reward_mean"])
        self.emit_train_step(index, groups, stats, trained_version, wait_s, phases)
        if checkpoint_due(self.step, self.cfg.train.checkpoint_every):
            self.save_checkpoint()

    def update_weights(self, new_version: int) -> dict[str, float]:
        """The weight-update protocol; returns the time of each phase."""
        phases: dict[str, float] = {}
        total_started = time.monotonic()

        def timed(name: str, action: Callable[[], Any]) -> Any:
            t0 = time.monotonic()
            result = action()
            phases[name] = phases.get(name, 0.0) + time.monotonic() - t0
            return result

        timed("pause_s", self.executor.pause)
        finish_recompute = (
            self.executor.start_recompute_proximal(self.version)
            if self.cfg.train.prox_mode == ProxMode.segment
            else None
        )
        # The export touches no server, so it runs while the servers (still at v) score.
        weights = timed(
            "export_s", lambda: self.actor.export_weights(self.run_dir / "weights", new_version)
        )
        if finish_recompute is not None:
            timed("recompute_s", finish_recompute)
        server_phases = timed("reload_s", lambda: self.update_servers(weights, new_version))
        timed("set_version_s", lambda: self.executor.set_version(new_version))
        timed("resume_s", self.executor.resume)
        total_s = time.monotonic() - total_started
        self.events.emit(
            "weight_update",
            version=new_version,
            phases=phases,
            server_phases=server_phases,
            weights_dir=str(weights),
            total_s=total_s,
        )
        return {**phases, "total_s": total_s}

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
        cycle_s = wait_s + step_s + phases["total_s"]
        self.events.emit(
            "train_step",
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
            stats=stats,
            rollouts=len(groups),
            rollout_ids=[g.rollout_id for g in groups],
            # Data positions identify a sample across a resume (rollout ids restart at v·B).
            positions=[g.meta.get("position") for g in groups],
            samples=samples,
            tokens=tokens,
            wait_s=wait_s,
            step_s=step_s,
            update_s=phases["total_s"],
            samples_per_s=samples / cycle_s if cycle_s > 0 else 0.0,
            gen_tokens_per_s=tokens / cycle_s if cycle_s > 0 else 0.0,
        )

    def save_checkpoint(self) -> Path:
        state = TrainState(
            step=self.step,
            version=self.version,
            data_position=self.data_position(),
        )
        path = save_checkpoint(
            self.run_dir,
            self.actor.model,
            self.actor.optimizer,
            state,
            keep=self.cfg.train.keep_checkpoints,
        )
        self.events.emit("checkpoint", step=self.step, version=self.version, path=str(path))
        return path
