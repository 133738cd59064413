"""scripts/bench_learning.py: the accuracy curve of a run read from its event log, the
--compare / --peer arguments, and curves merged side by side by step, by minute and at equal
wall time."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import EvalEvent, RolloutFinishedEvent, TrainStepEvent
from tests import REPO

SCRIPT = REPO / "scripts" / "bench_learning.py"


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: the script's dataclasses look their module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def evaluation(step: int, accuracy: float) -> EvalEvent:
    return EvalEvent(
        step=step,
        version=step,
        accuracy=accuracy,
        pass_at_k=accuracy,
        k=1,
        mean_reward=accuracy,
        n_prompts=128,
        temperature=0.0,
        seconds=1.0,
    )


def test_curve_gives_accuracy_before_and_after_in_points(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log:
        log.emit(evaluation(0, 0.25))
        for step in range(4):
            log.emit(TrainStepEvent(step=step, version=step, reward=0.1 * step, kl=0.01))
        log.emit(evaluation(4, 0.40))
    result = load_script().curve(tmp_path)
    assert result["before"] == 0.25 and result["after"] == 0.40
    assert round(result["gain_points"], 6) == 15.0
    assert result["steps"] == 4
    assert [p["step"] for p in result["curve"]] == [0, 4]


def test_curve_of_episodes_gives_turns_and_tool_calls_per_episode(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log:
        log.emit(evaluation(0, 0.25))
        for group in range(20):
            turns = [3, 1] if group < 1 else [1, 1]
            log.emit(
                RolloutFinishedEvent(
                    rollout_id=group,
                    version=group // 4,
                    accepted=True,
                    head_version=group // 4,
                    episode_turns=turns,
                    episode_tool_calls=[group, 0],
                )
            )
    result = load_script().curve(tmp_path)
    # A tenth of 20 groups: the first 2 (4 and 2 turns in 4 episodes), the last 2.
    assert result["turns_first_tenth"] == pytest.approx(6 / 4)
    assert result["turns_last_tenth"] == 1.0
    assert result["tool_calls_first_tenth"] == pytest.approx(1 / 4)
    assert result["tool_calls_last_tenth"] == pytest.approx((18 + 19) / 4)
    assert result["turns_by_version"][0] == pytest.approx(10 / 8)
    assert result["turns_by_version"][4] == 1.0


def test_a_single_turn_curve_has_no_episode_figures(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log:
        log.emit(RolloutFinishedEvent(rollout_id=0, version=0, accepted=True, head_version=0))
        log.emit(TrainStepEvent(step=0, version=0))
    assert "turns_first_tenth" not in load_script().curve(tmp_path)


def test_compare_takes_a_key_and_two_or_more_values_with_brackets_kept_whole() -> None:
    script = load_script()
    args, extra = script.parse_args(
        ["--compare", "task.curriculum.attributes=[num_terms],[num_terms,num_digits]", "x=1"]
    )
    assert args.compare == ("task.curriculum.attributes", ["[num_terms]", "[num_terms,num_digits]"])
    assert extra == ["x=1"]
    names = [v.name for v in script.variants(args)]
    assert names == [
        "task.curriculum.attributes=[num_terms]",
        "task.curriculum.attributes=[num_terms,num_digits]",
    ]
    # Run directories Hydra accepts in run.dir=..., one per variant.
    dirs = [script.slug(name) for name in names]
    assert dirs == [
        "task.curriculum.attributes-num_terms",
        "task.curriculum.attributes-num_terms-num_digits",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--compare", "train.lr=1e-6"],
        ["--compare", "train.lr"],
        ["--compare", "=1,2"],
        ["--compare", "train.lr=1e-6,"],
        ["--peer", "verl"],
        ["--minutes", "0"],
        ["--seeds", "0,x"],
        ["--workload", "chess"],
        ["--eval-everyy", "3"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        load_script().parse_args(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_peer_runs_after_the_sdp_variants_with_the_same_seeds_and_evaluation(
    tmp_path: Path,
) -> None:
    script = load_script()
    args, extra = script.parse_args(
        ["--peer", "trl", "--workload", "long", "--eval-prompts", "16", "rollout.batch_size=2"]
    )
    sdp, peer = script.variants(args)
    assert (sdp.name, peer.name, peer.peer) == ("sdp", "trl", "trl")
    sdp_command = script.run_command(sdp, tmp_path / "a", 1, args, extra)
    peer_command = script.run_command(peer, tmp_path / "b", 1, args, extra)
    shared = ["run.seed=1", "task.seed=1", "eval.n_prompts=16", "eval.temperature=0"]
    for command in (sdp_command, peer_command):
        assert {*shared, "rollout.batch_size=2"} <= set(command)
        assert any(part.endswith("smollm2-long.yaml") for part in command)
    assert str(script.TRL_SCRIPT) in peer_command and "train" in sdp_command


def points(*rows: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"step": s, "accuracy": a, "t_s": t} for s, a, t in rows]


def test_curves_merge_by_step_and_by_minute_and_compare_at_equal_wall_time() -> None:
    script = load_script()
    curves = {
        "sdp": points((0, 0.40, 50), (10, 0.55, 130), (20, 0.62, 200)),
        "trl": points((0, 0.40, 20), (10, 0.45, 170)),
    }
    by_step = script.side_by_side_steps(curves)
    assert by_step == [
        {"step": 0, "sdp": 0.40, "trl": 0.40},
        {"step": 10, "sdp": 0.55, "trl": 0.45},
        {"step": 20, "sdp": 0.62, "trl": None},
    ]
    by_minute = script.side_by_side_minutes(curves, 3)
    assert by_minute == [
        {"minute": 1, "sdp": 0.40, "trl": 0.40},
        {"minute": 2, "sdp": 0.40, "trl": 0.40},
        {"minute": 3, "sdp": 0.55, "trl": 0.45},
    ]
    at, accuracy = script.equal_time_accuracy(curves, budget_s=180)
    # At the end of the 180 s budget: sdp's evaluation at 200 s came too late to count.
    assert at == 180 and accuracy == {"sdp": 0.55, "trl": 0.45}
    assert script.time_to_gain(curves["sdp"], 10) == 130
    assert script.time_to_gain(curves["trl"], 10) is None


def test_completions_per_s_leaves_out_start_up_and_evaluation(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log:
        log.emit(replace(evaluation(0, 0.25), ts=100.0))
        for step, ts in enumerate([160.0, 170.0, 180.0]):
            log.emit(TrainStepEvent(step=step, version=step, samples=16, ts=ts))
        log.emit(replace(evaluation(2, 0.30), ts=185.0, seconds=5.0))
        log.emit(TrainStepEvent(step=3, version=3, samples=16, ts=195.0))
    result = load_script().curve(tmp_path, launched=90.0)
    # Steps 2-4 trained 48 completions in 35 s, 5 s of which were evaluation.
    assert result["completions_per_s"] == 48 / 30
    assert [p["t_s"] for p in result["curve"]] == [10.0, 95.0]


def test_a_run_that_left_no_log_gives_an_empty_curve(tmp_path: Path) -> None:
    result = load_script().curve(tmp_path / "never-started", launched=0.0)
    assert result["curve"] == [] and result["steps"] == 0 and result["gain_points"] is None
