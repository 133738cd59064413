"""The event schema: one dataclass per event type, and what parsing a log line accepts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import pytest

from sdp_cli.events.event_log import event_line
from sdp_cli.events.event_schema import (
    EVENT_TYPES,
    BatchTakenEvent,
    Event,
    EventSchemaError,
    ServerStateEvent,
    TrainStepEvent,
    event_type,
    parse_event,
)

ALL_TYPES = {
    "run_started",
    "server_state",
    "rollout_submitted",
    "rollout_finished",
    "sample_dropped",
    "capacity",
    "batch_taken",
    "proximal_recompute",
    "weight_update",
    "train_step",
    "checkpoint",
    "run_finished",
}


def test_every_event_type_of_the_run_log_has_its_dataclass() -> None:
    assert set(EVENT_TYPES) >= ALL_TYPES
    for name, cls in EVENT_TYPES.items():
        assert cls.type == name
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, name  # type: ignore[attr-defined]


def test_a_server_state_from_a_local_process_has_no_node() -> None:
    event = parse_event(
        {"type": "server_state", "server": 0, "address": "127.0.0.1:8001", "state": "ready"}
    )
    assert event == ServerStateEvent(server=0, address="127.0.0.1:8001", state="ready")
    assert isinstance(event, ServerStateEvent) and event.node is None


def test_a_written_event_reads_back_equal_under_strict_parsing() -> None:
    event = TrainStepEvent(
        ts=5.0, step=3, version=3, reward=0.5, positions=[1, None], stats={"loss": 0.1}
    )
    assert parse_event(json.loads(event_line(event)), strict=True) == event


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "batch_taken", "version": 0}, "rollout_ids"),
        ({"type": "checkpoint", "step": "3", "version": 3, "path": "p"}, "checkpoint.step"),
        ({"type": "checkpoint", "step": True, "version": 3, "path": "p"}, "checkpoint.step"),
        ({"type": "rollout_finished", "rollout_id": 1, "version": 0, "accepted": 1}, "accepted"),
        ({"type": "weight_update", "version": 1, "phases": {"a": "x"}, "total_s": 1}, "phases"),
    ],
    ids=["missing-required", "str-for-int", "bool-for-int", "int-for-bool", "bad-map-value"],
)
def test_a_known_type_that_does_not_fit_raises(data: dict, message: str) -> None:
    with pytest.raises(EventSchemaError, match=message):
        parse_event(data)


def test_strict_parsing_refuses_fields_the_schema_does_not_declare() -> None:
    data = {"type": "server_state", "server": 0, "address": "a", "state": "ready", "index": 0}
    assert isinstance(parse_event(data), ServerStateEvent)  # a reader tolerates it
    with pytest.raises(EventSchemaError, match="index"):
        parse_event(data, strict=True)  # a test of a writer does not


def test_an_unknown_type_is_none() -> None:
    assert parse_event({"type": "written_by_a_newer_sdp", "x": 1}) is None


def test_an_optional_field_missing_from_an_older_log_takes_its_default() -> None:
    event = parse_event(
        {
            "type": "batch_taken",
            "version": 2,
            "rollout_ids": [1],
            "head_lags": [1],
            "tail_lags": [0],
            "tokens_by_lag": {"1": 4},
            "wait_s": 0,
        }
    )
    assert isinstance(event, BatchTakenEvent)
    assert event.step is None
    assert event.wait_s == 0.0 and isinstance(event.wait_s, float)


def test_a_type_name_is_registered_once() -> None:
    with pytest.raises(TypeError, match="twice"):

        @event_type
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Again(Event):
            type: ClassVar[str] = "train_step"


def test_every_line_a_simulated_run_writes_fits_the_schema(simulated_run_log: Path) -> None:
    kinds = set()
    for line in simulated_run_log.read_text().splitlines():
        event = parse_event(json.loads(line), strict=True)
        assert event is not None, line
        kinds.add(event.type)
    # What a simulation exercises: all but the trainer's checkpoints.
    assert kinds == ALL_TYPES - {"checkpoint"}
