"""The training loop with a fake actor and fake servers: the weight-update sequence runs every
step, and steps whose loss is not finite are skipped, counted, and stop the run after
train.max_nonfinite_steps in a row."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sdp_cli.config import SdpConfig, load_config
from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.run_plan import plan_run
from sdp_cli.config.task_settings import CurriculumConfig
from sdp_cli.config.train_settings import ProxMode, TrainConfig
from sdp_cli.errors import ConfigError
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.events.event_schema import CurriculumEvent, TrainStepEvent, WeightUpdateEvent
from sdp_cli.orchestrator.loop import NonFiniteTrainingError, TrainingLoop
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.rollout.executor import Gate, RolloutExecutor
from sdp_cli.rollout.positions import PositionState
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.levels import Schedule


class OneTokenWorkflow:
    def __init__(self) -> None:
        self.version = 0

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
        await gate()
        samples = [Trajectory([1], [5], [-1.0], [self.version], reward=float(i)) for i in (0, 1)]
        return RolloutGroup(rollout_id=rollout_id, samples=samples)


class FakeServers:
    def __init__(self, workflow: OneTokenWorkflow, reload_s: float = 0.0) -> None:
        self.workflow = workflow
        self.reload_s = reload_s
        self.loaded: list[int] = []

    async def abort_generation(self) -> None:
        pass

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        await asyncio.sleep(self.reload_s)
        self.loaded.append(version)
        self.workflow.version = version
        return {}


class ScriptedActor:
    """Reports `skipped` per step from a script; exports nothing."""

    def __init__(
        self, skipped: list[bool], tmp_path: Path, servers: FakeServers, step_s: float = 0.0
    ) -> None:
        self.skipped = list(skipped)
        self.step_s = step_s
        self.tmp_path = tmp_path
        self.servers = servers
        # Per step: the version trained, the servers' last loaded version, the batch.
        self.steps: list[tuple[int, int, list[RolloutGroup]]] = []

    def train_step(self, groups: list[RolloutGroup], version: int) -> dict[str, float]:
        self.steps.append((version, max(self.servers.loaded, default=0), groups))
        time.sleep(self.step_s)
        skipped = self.skipped.pop(0)
        return {
            "reward_mean": 0.5,
            "loss": float("nan") if skipped else 0.1,
            "skipped": 1.0 if skipped else 0.0,
            "step_time_s": 0.0,
        }

    def export_weights(self, weights_dir: Path, version: int, dtype: object = None) -> Path:
        return self.tmp_path / f"v{version}"


def run_loop(
    tmp_path: Path,
    skipped: list[bool],
    limit: int,
    overlap_reload: bool = True,
    reload_s: float = 0.0,
    step_s: float = 0.0,
) -> tuple[EventRecorder, ScriptedActor, Any]:
    cfg = SdpConfig()
    cfg = replace(
        cfg,
        run=replace(cfg.run, dir=str(tmp_path)),
        rollout=RolloutConfig(batch_size=1, max_staleness=1, max_concurrent=2),
        train=replace(
            TrainConfig(prox_mode=ProxMode.loglinear),
            steps=len(skipped),
            max_nonfinite_steps=limit,
            checkpoint_every=1000,
            overlap_reload=overlap_reload,
        ),
    )
    workflow = OneTokenWorkflow()
    servers = FakeServers(workflow, reload_s)
    actor = ScriptedActor(skipped, tmp_path, servers, step_s)
    sink = EventRecorder()
    executor = RolloutExecutor(workflow, cfg.rollout, cfg.train.prox_mode, events=sink)
    executor.start()
    loop = TrainingLoop(
        cfg,
        actor,  # type: ignore[arg-type]
        executor,
        servers,
        sink,
        data_positions=PositionState,
        start=TrainState(step=0, version=0, data_position=0),
        plan=plan_run(cfg),
    )
    try:
        outcome: Any = loop.run()
    except NonFiniteTrainingError as exc:
        outcome = exc
    finally:
        executor.stop()
    return sink, actor, outcome


def test_skipped_steps_are_counted_and_a_finite_step_resets_the_run_of_them(
    tmp_path: Path,
) -> None:
    sink, actor, result = run_loop(tmp_path, [True, False, True, True, False], limit=3)
    servers = actor.servers
    assert not isinstance(result, Exception) and result.steps == 5
    steps = sink.of(TrainStepEvent)
    assert [e.skipped for e in steps] == [True, False, True, True, False]
    assert [e.skipped_steps for e in steps] == [1, 1, 2, 3, 3]
    # A skipped step still moves the version: the servers load every one.
    assert servers.loaded == [1, 2, 3, 4, 5]
    assert len(sink.of(WeightUpdateEvent)) == 5


def test_the_run_stops_after_max_nonfinite_steps_in_a_row(tmp_path: Path) -> None:
    sink, _, outcome = run_loop(tmp_path, [False, True, True, False], limit=2)
    assert isinstance(outcome, NonFiniteTrainingError)
    assert "2 training steps in a row" in str(outcome)
    assert "train.max_nonfinite_steps" in str(outcome)
    assert len(sink.of(TrainStepEvent)) == 3


@pytest.mark.parametrize("overlap_reload", [True, False])
def test_with_overlap_reload_the_next_step_trains_while_the_servers_reload(
    tmp_path: Path, overlap_reload: bool
) -> None:
    steps = 5
    # Steps longer than the reload, as on a real model, so the buffer refills meanwhile.
    sink, actor, result = run_loop(
        tmp_path, [False] * steps, 1, overlap_reload, reload_s=0.2, step_s=0.4
    )
    assert not isinstance(result, Exception) and result.steps == steps
    assert actor.servers.loaded == [1, 2, 3, 4, 5], "every update finished, in order"
    trained = [g.rollout_id for _, _, groups in actor.steps for g in groups]
    assert len(trained) == len(set(trained)) == steps, "no batch lost or trained twice"
    for version, _, groups in actor.steps:
        for group in groups:
            # Within the bound at the version trained, though the servers may be behind.
            assert 0 <= group.head_lag(version) <= 1
    behind = [version - servers_at for version, servers_at, _ in actor.steps]
    updates = sink.of(WeightUpdateEvent)
    waits = [e.trainer_wait_s for e in updates]
    if overlap_reload:
        # Steps 1-4 start before the servers hold their weights; the last update, with no
        # step after it, runs in the foreground.
        assert behind == [0, 1, 1, 1, 1]
        for wait, update in zip(waits[:-1], updates[:-1], strict=True):
            assert wait is not None and wait < 0.2 <= update.total_s
        assert waits[-1] == updates[-1].total_s
    else:
        assert behind == [0] * steps
        assert waits == [e.total_s for e in updates]
    step_events = sink.of(TrainStepEvent)
    assert [e.update_s for e in step_events] == waits


@pytest.mark.parametrize("value", [0, -1])
def test_max_nonfinite_steps_must_be_positive(value: int) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_nonfinite_steps"):
        load_config(None, [f"train.max_nonfinite_steps={value}"])


def test_the_curriculum_level_is_announced_logged_per_step_and_checkpointed(
    tmp_path: Path,
) -> None:
    cfg = SdpConfig()
    cfg = replace(
        cfg,
        run=replace(cfg.run, dir=str(tmp_path)),
        rollout=RolloutConfig(batch_size=1, max_staleness=1, max_concurrent=2),
        train=replace(TrainConfig(prox_mode=ProxMode.loglinear), steps=5, checkpoint_every=5),
    )
    workflow = OneTokenWorkflow()
    servers = FakeServers(workflow)
    actor = CheckpointingActor([False] * 5, tmp_path, servers)
    sink = EventRecorder()
    executor = RolloutExecutor(workflow, cfg.rollout, cfg.train.prox_mode, events=sink)
    executor.start()
    schedule = Schedule(CurriculumConfig(mode="step", every_steps=2, end_level=3))
    loop = TrainingLoop(
        cfg,
        actor,  # type: ignore[arg-type]
        executor,
        servers,
        sink,
        data_positions=lambda: PositionState(next_position=7),
        start=TrainState(step=0, version=0, data_position=0),
        plan=plan_run(cfg),
        curriculum=schedule,
    )
    try:
        loop.run()
    finally:
        executor.stop()
    announced = [(e.step, e.position, e.level, e.reason) for e in sink.of(CurriculumEvent)]
    assert announced == [(0, 0, 0, "start"), (2, 7, 1, "step"), (4, 7, 2, "step")]
    assert [e.curriculum_level for e in sink.of(TrainStepEvent)] == [0, 1, 1, 2, 2]
    saved = actor.saved[-1].curriculum
    assert saved is not None
    assert saved["changes"] == [[0, 0, 0], [2, 7, 1], [4, 7, 2]]


class CheckpointingActor(ScriptedActor):
    def __init__(self, skipped: list[bool], tmp_path: Path, servers: FakeServers) -> None:
        super().__init__(skipped, tmp_path, servers)
        self.saved: list[TrainState] = []

    def save_checkpoint(self, run_dir: Path, state: TrainState, keep: int | None) -> Path:
        self.saved.append(state)
        return run_dir / f"step-{state.step}"
