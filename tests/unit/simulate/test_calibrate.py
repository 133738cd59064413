"""`sdp simulate --calibrate`: parameters read back from a log the simulator wrote with known
timing, and predictions of the run it was calibrated on and of another configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config import load_config
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import TrainStepEvent
from sdp_cli.simulate import run_simulation
from sdp_cli.simulate.calibrate import (
    fixed_step_s,
    line_fit,
    read_calibration,
    simulate_to_log,
    steady_train_steps,
    step_time_line,
)

runner = CliRunner()

TRUE_TIMING = {
    "simulate.token_latency_s": 0.01,
    "simulate.mean_new_tokens": 24,
    "simulate.train_step_s": 0.3,
    "simulate.update_s": 0.05,
}
RUN_SHAPE = [
    "train.steps=12",
    "server.count=2",
    "rollout.batch_size=4",
    "rollout.max_concurrent=16",
    "rollout.max_staleness=1",
]


def overrides(shape: list[str]) -> list[str]:
    return [*shape, *(f"{key}={value}" for key, value in TRUE_TIMING.items())]


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("calibration-run")
    simulate_to_log(load_config(None, overrides(RUN_SHAPE)), run_dir / "events.jsonl")
    return run_dir


def calibrated_json(run_dir: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["simulate", "--calibrate", str(run_dir), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_calibration_reads_back_the_timing_the_log_was_made_with(calibration_run: Path) -> None:
    calibration = read_calibration(calibration_run)
    # Gamma-distributed lengths: the mean over ~50 groups is within a few percent of 24.
    assert calibration.mean_new_tokens == pytest.approx(24, rel=0.15)
    assert calibration.step_intercept_s == pytest.approx(0.3)
    assert calibration.step_s_per_token == 0.0
    assert calibration.update_s == pytest.approx(0.05, rel=1e-6)
    # The first step, which warms the trainer up in a real run, is left out of the step time.
    assert calibration.steps == 11 and calibration.updates == 12
    # The simulated servers' prefill does not follow the prompt: it is fitted on its own.
    assert calibration.prompt_tokens is None
    assert len(calibration.new_tokens) == 20 and list(calibration.new_tokens) == sorted(
        calibration.new_tokens
    )
    # Submit→finish includes waiting for a group's longest completion and pauses: above 0.01.
    assert calibration.rollout_token_latency_s > 0.01


def test_step_time_is_a_line_in_tokens() -> None:
    intercept, slope = line_fit([100, 200, 300], [1.5, 2.5, 3.5])
    assert (intercept, slope) == pytest.approx((0.5, 0.01))
    assert line_fit([100, 100], [1.0, 2.0]) == (1.5, 0.0)


def test_step_time_of_a_run_at_one_batch_size_scales_with_the_tokens() -> None:
    # A real SmolLM2 run at one batch size: its least-squares line falls (9.3 s − 15 ms·token)
    # and put twice the batch at 0 s; proportional, twice the tokens take twice the time.
    tokens = [218, 222, 227, 226, 218, 211, 219, 179, 208, 205]
    seconds = [6.1, 5.76, 5.73, 5.91, 5.79, 6.06, 6.21, 6.48, 6.54, 6.14]
    assert line_fit(tokens, seconds)[1] < 0
    intercept, slope = step_time_line(tokens, seconds)
    assert intercept == 0.0
    assert slope * 2 * 213.3 == pytest.approx(2 * sum(seconds) / len(seconds), rel=0.05)
    # A log whose steps say how long their optimizer step took gives that as the fixed part.
    steps = [TrainStepEvent(step=i, version=i, stats={"optimizer_s": 1.5 + i}) for i in range(3)]
    assert fixed_step_s(steps) == pytest.approx(2.5)
    assert fixed_step_s([*steps, TrainStepEvent(step=3, version=3)]) == 0.0
    # With the optimizer's 2 s a step known not to grow with the batch, only the rest doubles.
    mean_tokens, mean_s = sum(tokens) / len(tokens), sum(seconds) / len(seconds)
    intercept, slope = step_time_line(tokens, seconds, fixed=2.0)
    assert intercept == 2.0
    assert intercept + slope * 2 * mean_tokens == pytest.approx(2 + 2 * (mean_s - 2), rel=0.05)
    # Steps that all took the same time (a simulated trainer): flat.
    assert step_time_line([100, 150, 120], [0.5, 0.5, 0.5]) == (0.5, 0.0)
    # Two batch sizes: the least-squares line.
    assert step_time_line([100, 200, 300], [1.5, 2.5, 3.5]) == pytest.approx((0.5, 0.01))


def test_calibrated_simulation_recovers_the_token_latency(calibration_run: Path) -> None:
    result = runner.invoke(app, ["simulate", "--calibrate", str(calibration_run)])
    assert result.exit_code == 0, result.output
    latency = float(result.output.split("simulate.token_latency_s=")[1].split(",")[0])
    per_seq = float(result.output.split("simulate.token_latency_per_seq_s=")[1].split()[0])
    # The log was made with 10 ms per token whatever the batch: the line is (nearly) flat.
    assert latency + per_seq * 8 == pytest.approx(0.01, rel=0.1)
    assert "step_s ≈ 0.3 + 0·tokens" in result.output


def test_latency_grows_with_the_completions_decoding_at_once(tmp_path: Path) -> None:
    # A server whose tokens take 4 ms plus 1 ms for each other completion in its batch.
    timing = ["simulate.token_latency_s=0.004", "simulate.token_latency_per_seq_s=0.001"]
    shape = ["train.steps=12", "server.count=1", "rollout.batch_size=4", "rollout.n_samples=4"]
    shape += ["rollout.max_concurrent=16", "rollout.max_staleness=0", "simulate.server_batch=64"]
    run_dir = tmp_path / "run"
    simulate_to_log(load_config(None, [*shape, *timing]), run_dir / "events.jsonl")
    calibration = read_calibration(run_dir)
    assert calibration.latency_per_seq_s > 0
    # More requests at once (η = 2, twice the batch): the flat latency of one run would miss.
    change = ["rollout.max_staleness=2", "rollout.batch_size=8", "rollout.max_concurrent=48"]
    predicted = calibrated_json(run_dir, *change)
    truth = run_simulation(load_config(None, [*shape, *timing, *change]))
    assert predicted["samples_per_s"] == pytest.approx(truth["samples_per_s"], rel=0.15)


def burst_run(tmp_path: Path, prefill_s: float, per_seq_s: float) -> Path:
    """The log of 20 steps of 32 completions arriving together on one server, without jitter:
    a token takes 20 ms plus `per_seq_s` per completion decoding, a prefill `prefill_s`."""
    timing = [
        f"simulate.prefill_s={prefill_s}",
        "simulate.token_latency_s=0.02",
        f"simulate.token_latency_per_seq_s={per_seq_s}",
        "simulate.mean_new_tokens=32",
        "simulate.latency_jitter=0",
    ]
    shape = ["train.steps=20", "server.count=1", "rollout.batch_size=8", "rollout.n_samples=4"]
    shape += ["rollout.max_staleness=0", "simulate.server_batch=64"]
    run_dir = tmp_path / "run"
    simulate_to_log(load_config(None, [*shape, *timing]), run_dir / "events.jsonl")
    return run_dir


def test_calibration_recovers_prefill_and_the_latency_line(tmp_path: Path) -> None:
    # At η = 0 the 32 completions of a step arrive together: each waits for 32 prefills, then
    # decodes while the batch thins out as the others finish (the latency line's range).
    run_dir = burst_run(tmp_path, prefill_s=0.05, per_seq_s=0.002)
    calibration = read_calibration(run_dir)
    assert calibration.prefill_s == pytest.approx(0.05, rel=0.1)
    assert calibration.latency_intercept_s == pytest.approx(0.02, rel=0.1)
    assert calibration.latency_per_seq_s == pytest.approx(0.002, rel=0.1)
    assert f"simulate.prefill_s={calibration.prefill_s * 2:.6g}" in calibration.overrides_for(
        load_config(None, ["rollout.batch_size=8", "rollout.n_samples=4"]), 2.0
    )


def as_a_train_log(run_dir: Path) -> None:
    """Mark a simulated log as `sdp train` marks its own (`run_started.mode`)."""
    path = run_dir / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for event in events:
        if event["type"] == "run_started":
            event["mode"] = "train"
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def test_a_vllm_log_ties_the_prefill_to_the_latency_line(tmp_path: Path) -> None:
    # Servers whose step costs 20 ms plus 5 ms per token in it, prompt or decoding: the
    # simulated workflow's 4-token prompts prefill in 20 ms each.
    run_dir = burst_run(tmp_path, prefill_s=0.02, per_seq_s=0.005)
    as_a_train_log(run_dir)
    calibration = read_calibration(run_dir)
    assert calibration.prompt_tokens == 4
    assert calibration.prefill_s == pytest.approx(4 * calibration.latency_per_seq_s)
    assert calibration.latency_intercept_s == pytest.approx(0.02, rel=0.1)
    assert calibration.latency_per_seq_s == pytest.approx(0.005, rel=0.1)


def test_calibration_hands_the_simulator_the_run_s_completion_lengths(tmp_path: Path) -> None:
    # Three completions in four stop at the longest allowed, 16 tokens; the others at 5.
    lengths = ["simulate.new_tokens=[5,16,16,16]", "train.steps=8", "rollout.max_staleness=0"]
    run_dir = tmp_path / "run"
    simulate_to_log(load_config(None, lengths), run_dir / "events.jsonl")
    drawn = [
        tokens
        for line in (run_dir / "events.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "rollout_finished"
        for tokens in json.loads(line).get("completion_tokens") or []
    ]
    assert drawn and set(drawn) == {5, 16}
    calibration = read_calibration(run_dir)
    assert set(calibration.new_tokens) == {5, 16}
    # The quantiles keep the shares: 20 × 3/4 = 15 of them at 16, give or take the draw.
    assert 11 <= calibration.new_tokens.count(16) <= 19
    assert calibration.new_tokens == tuple(sorted(calibration.new_tokens))
    cfg = load_config(None, [])
    listed = ",".join(str(n) for n in calibration.new_tokens)
    assert f"simulate.new_tokens=[{listed}]" in calibration.overrides_for(cfg, 1.0)


# A SmolLM2-135M run on CPU vLLM: a chat prompt's prefill takes about 76 ms, a token 62 ms plus
# 4 ms for each completion decoding beside it; 16 short completions per step at η = 0.
PREFILL_TIMING = [
    "simulate.prefill_s=0.076",
    "simulate.token_latency_s=0.062",
    "simulate.token_latency_per_seq_s=0.004",
    "simulate.mean_new_tokens=16",
    "simulate.train_step_s=0.5",
    "simulate.update_s=0.2",
]
PREFILL_SHAPE = [
    "train.steps=16",
    "server.count=1",
    "rollout.batch_size=4",
    "rollout.n_samples=4",
    "rollout.max_staleness=0",
    "simulate.server_batch=64",
]


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("prefill-run")
    cfg = load_config(None, [*PREFILL_SHAPE, *PREFILL_TIMING])
    simulate_to_log(cfg, run_dir / "events.jsonl")
    return run_dir


@pytest.mark.parametrize("change", [["rollout.max_staleness=2"], ["rollout.batch_size=8"]])
def test_a_run_whose_prompts_arrive_together_predicts_other_configurations(
    prefill_run: Path, change: list[str]
) -> None:
    """The prefill of a burst is a third of its rollout time: a latency line alone (no
    prefill) mispredicted twice the batch by 15% and more."""
    result = runner.invoke(
        app,
        [
            "simulate",
            "--calibrate",
            str(prefill_run),
            "--json",
            "simulate.server_batch=64",
            *change,
        ],
    )
    assert result.exit_code == 0, result.output
    printed = float(result.stderr.split("simulate.prefill_s=")[1].split(",")[0])
    assert printed == pytest.approx(0.076, rel=0.2)
    predicted = json.loads(result.stdout)
    truth = run_simulation(load_config(None, [*PREFILL_SHAPE, *PREFILL_TIMING, *change]))
    assert predicted["samples_per_s"] == pytest.approx(truth["samples_per_s"], rel=0.15)


@pytest.mark.parametrize(
    "change",
    [[], ["rollout.max_staleness=2", "rollout.batch_size=8"], ["rollout.max_staleness=0"]],
)
def test_calibrated_simulation_predicts_the_run_and_another_configuration(
    calibration_run: Path, change: list[str]
) -> None:
    predicted = calibrated_json(calibration_run, *change)
    truth = run_simulation(load_config(None, overrides([*RUN_SHAPE, *change])))
    assert predicted["batch_size"] == truth["batch_size"]
    assert predicted["max_staleness"] == truth["max_staleness"]
    assert predicted["samples_per_s"] == pytest.approx(truth["samples_per_s"], rel=0.1)


def test_the_step_time_scales_with_the_batch(tmp_path: Path) -> None:
    # A log whose step time grows with tokens (0.1 s + 2 ms per token) at two batch sizes,
    # after a first step that warmed up (2 s; left out).
    run_dir = tmp_path / "run"
    lines = [
        {"type": "run_started", "ts": 0.0, "run": "r", "steps": 3, "max_staleness": 0,
         "batch_size": 2, "strategy": "segment_wise", "prox_mode": "recompute",
         "n_samples": 2, "max_concurrent": 4, "server_count": 1},
        {"type": "rollout_submitted", "ts": 1.0, "rollout_id": 0, "version": 0},
        {"type": "rollout_finished", "ts": 2.0, "rollout_id": 0, "version": 0,
         "accepted": True, "n_tokens": 100},
        {"type": "train_step", "ts": 3.0, "step": 0, "version": 0, "tokens": 100,
         "step_s": 2.0},
        {"type": "train_step", "ts": 4.0, "step": 1, "version": 1, "tokens": 100,
         "step_s": 0.3},
        {"type": "train_step", "ts": 5.0, "step": 2, "version": 2, "tokens": 200,
         "step_s": 0.5},
    ]  # fmt: skip
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    calibration = read_calibration(run_dir)
    assert calibration.rollout_token_latency_s == pytest.approx(0.02)
    assert calibration.mean_new_tokens == 50
    assert calibration.train_step_s(400) == pytest.approx(0.9)
    # 8 prompts × 2 samples × 50 tokens = 800 tokens: 0.1 + 0.002 · 800.
    cfg = load_config(None, ["rollout.batch_size=8", "rollout.n_samples=2"])
    assert "simulate.train_step_s=1.7" in calibration.overrides_for(cfg, 1.0)


def test_the_first_step_after_each_start_is_left_out_of_the_step_time(tmp_path: Path) -> None:
    started = {"type": "run_started", "run": "r", "steps": 4, "max_staleness": 0,
               "batch_size": 2, "strategy": "segment_wise", "prox_mode": "segment",
               "n_samples": 2, "max_concurrent": 4, "server_count": 1}  # fmt: skip

    def step(index: int, **more: Any) -> dict[str, Any]:
        return {"type": "train_step", "step": index, "version": index, "step_s": 1.0, **more}

    # Steps 0 and 1, a resume, steps 2 (its first) and 3; step 1 was skipped (not finite).
    lines = [started, step(0), step(1, skipped=True), {**started, "resumed_from_step": 2}]
    lines += [step(2), step(3)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [e.step for e in steady_train_steps(list(read_events(path)))] == [3]
    # A log of one step per start keeps them all.
    path.write_text(json.dumps(started) + "\n" + json.dumps(step(0)) + "\n")
    assert [e.step for e in steady_train_steps(list(read_events(path)))] == [0]


def test_calibrate_without_a_log_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--calibrate", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run log" in result.output
