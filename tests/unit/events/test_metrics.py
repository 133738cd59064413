"""Curves: the run's typed events become TensorBoard and W&B (offline) scalars under the event
field names, read back through each backend's own reader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sdp_cli.events.event_log import EventLog, read_events
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    EvalEvent,
    SampleDroppedEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)
from sdp_cli.events.metrics import MetricsSink, open_writers


def emit_a_short_run(sink: MetricsSink) -> None:
    for step in range(3):
        sink.emit(
            BatchTakenEvent(
                version=step,
                rollout_ids=[1, 2],
                head_lags=[0, 1],
                tail_lags=[0, 0],
                tokens_by_lag={"0": 10, "1": 4},
                wait_s=0.1,
                step=step,
            )
        )
        sink.emit(
            TrainStepEvent(
                step=step, version=step, reward=0.1 * step, loss=1.0 - step, entropy=2.0, kl=0.01
            )
        )
        sink.emit(
            WeightUpdateEvent(
                version=step + 1,
                phases={"reload_s": 0.05},
                total_s=0.1,
                generation_pause_s=0.06,
                update_mode="keep",
            )
        )
    sink.emit(
        SampleDroppedEvent(
            rollout_id=9, reason="head_lag", point="purge", head_lag=3, tail_lag=1, version=3
        )
    )
    sink.emit(
        EvalEvent(
            step=3,
            version=3,
            accuracy=0.25,
            pass_at_k=0.5,
            k=4,
            mean_reward=0.3,
            n_prompts=8,
            temperature=0.0,
            seconds=1.0,
        )
    )


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_gets_the_event_fields_by_trainer_step(tmp_path: Path) -> None:
    writers = open_writers(
        ["tensorboard"], tmp_path, project="sdp", mode="offline", name="t", config={}
    )
    sink = MetricsSink(EventLog(tmp_path / "events.jsonl"), writers)
    emit_a_short_run(sink)
    sink.close()

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/reward"]] == [0, 1, 2]
    assert [v for _, v in scalars["train/reward"]] == pytest.approx([0.0, 0.1, 0.2])
    assert [v for _, v in scalars["train/loss"]] == [1.0, 0.0, -1.0]
    assert scalars["train/entropy"][0] == (0, 2.0)
    assert scalars["eval/accuracy"] == [(3, 0.25)]
    assert scalars["eval/pass@4"] == [(3, 0.5)]
    assert scalars["drops/head_lag"] == [(3, 1.0)]
    assert [s for s, _ in scalars["update/reload_s"]] == [1, 2, 3]
    # "Pause per update", a first-class curve in either update mode.
    assert [v for _, v in scalars["update/generation_pause_s"]] == pytest.approx([0.06] * 3)
    assert scalars["lag/tokens_lag_1"][0] == (0, 4.0)
    # The event log is still written in full, through the schema.
    logged = list(read_events(tmp_path / "events.jsonl"))
    assert [type(e).__name__ for e in logged].count("TrainStepEvent") == 3


def test_wandb_offline_run_is_written_without_network(tmp_path: Path) -> None:
    writers = open_writers(["wandb"], tmp_path, project="sdp", mode="offline", name="t", config={})
    sink = MetricsSink(EventLog(tmp_path / "events.jsonl"), writers)
    emit_a_short_run(sink)
    # W&B's own summary: the last value of each scalar, under the event names.
    summary = writers[0].run.summary  # type: ignore[attr-defined]
    assert summary["train/reward"] == pytest.approx(0.2)
    assert summary["eval/accuracy"] == 0.25
    assert summary["drops/head_lag"] == 1.0
    sink.close()

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    # The offline file (what `wandb sync` uploads) holds the history under those names; W&B's
    # service process may still be flushing it when finish() returns.
    keys = (b"train/reward", b"train/kl", b"eval/pass@4", b"trainer_step")
    deadline = time.monotonic() + 60
    while not all(key in run_file.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = run_file.read_bytes()
    assert [key for key in keys if key not in data] == []
