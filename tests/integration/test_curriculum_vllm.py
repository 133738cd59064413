"""`sdp train` with task.curriculum on real vLLM CPU servers (tiny model, reasoning-gym
chain_sum): the level rises with the step, every trained prompt has the difficulty of the level
its data position was handed out at, and a resumed run continues the same schedule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import CurriculumEvent, RunStartedEvent, TrainStepEvent
from sdp_cli.orchestrator.sample_log import read_samples

pytestmark = pytest.mark.vllm
runner = CliRunner()

CURRICULUM = [
    "task=reasoning_gym",
    "task.dataset=chain_sum",
    "task.dataset_size=400",
    "task.dataset_config={min_terms: 4, max_terms: 4, min_digits: 1, max_digits: 1}",
    "task.curriculum.mode=step",
    "task.curriculum.every_steps=2",
    "task.curriculum.end_level=2",
    "rollout.batch_size=2",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=4",
    "rollout.max_concurrent=8",
    "log.samples_per_step=100",
]


def train(run_dir: Path, *overrides: str) -> None:
    result = runner.invoke(app, ["train", f"run.dir={run_dir}", *CURRICULUM, *overrides])
    assert result.exit_code == 0, result.output


def terms(prompt: str) -> int:
    return len(re.findall(r"\d+", prompt.split(":")[-1]))


def test_levels_rise_with_the_step_follow_the_data_position_and_survive_a_resume(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=4", "train.checkpoint_every=2")
    state = json.loads((run_dir / "checkpoints" / "step-4" / "state.json").read_text())
    assert [level for _, _, level in state["curriculum"]["changes"]] == [0, 1, 2]
    # Up to (η + v + 1)·B positions are handed out ahead of training: 10 steps train 20
    # distinct positions, more than the 14 below the level-2 change, so level 2 is trained.
    train(run_dir, "train.steps=10", "train.checkpoint_every=2", "resume=true")

    events = list(read_events(run_dir / "events.jsonl"))
    assert any(isinstance(e, RunStartedEvent) and e.resumed_from_step == 4 for e in events)
    announced = [e for e in events if isinstance(e, CurriculumEvent)]
    assert [(e.step, e.level, e.reason) for e in announced] == [
        (0, 0, "start"),
        (2, 1, "step"),
        (4, 2, "step"),
        (4, 2, "resume"),
    ]
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    assert [s.curriculum_level for s in steps] == [0, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    changes = [(e.position, e.level) for e in announced]

    def level_at(position: int) -> int:
        return max((c for c in changes if c[0] <= position), key=lambda c: c[0])[1]

    trained = [r for r in read_samples(run_dir / "samples.jsonl") if r["kind"] == "trained"]
    assert len(trained) == 10 * 2 * 2
    # Level k trains chain_sum with 2 + k terms, whatever the target (4 terms) says.
    for record in trained:
        assert terms(record["prompt"]) == 2 + level_at(record["position"]), record
    assert {terms(r["prompt"]) for r in trained} == {2, 3, 4}
