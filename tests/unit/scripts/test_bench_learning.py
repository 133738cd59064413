"""scripts/bench_learning.py reads the accuracy curve of a run from its event log."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import EvalEvent, TrainStepEvent
from tests import REPO

SCRIPT = REPO / "scripts" / "bench_learning.py"


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
