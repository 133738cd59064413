"""The hand-made small run of small_run.py, as events and as a run directory's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdp_cli.events.event_schema import Event
from tests.unit.views import small_run


@pytest.fixture
def small_run_events() -> list[Event]:
    return small_run.small_run_events()


@pytest.fixture
def small_run_log(tmp_path: Path) -> Path:
    """RUN_DIR/events.jsonl of the small run, with one event of an unknown type in the middle
    and a truncated last line."""
    return small_run.write_small_run_log(tmp_path / "runs" / "small" / "events.jsonl")
