"""The run log: one JSON object per line with `ts`, `type` and the event's fields.

Event types (DESIGN §7): rollout_submitted, rollout_finished, sample_dropped, batch_taken,
capacity, weight_update, server_state, train_step; readers skip types they do not know.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol


class EventSink(Protocol):
    def emit(self, type: str, **fields: Any) -> None: ...


class NullEventLog:
    """Discards events (unit tests, simulations that keep no log)."""

    def emit(self, type: str, **fields: Any) -> None:
        return None


class EventLog:
    """Appends events to a JSONL file. Thread-safe; each line is flushed as it is written so
    `sdp inspect-staleness --follow` and the dashboard see a running run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def emit(self, type: str, **fields: Any) -> None:
        line = json.dumps({"ts": time.time(), "type": type, **fields}, default=_jsonable)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):
        return value.value
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the events of a log. A truncated or unparsable line (a run killed mid-write) is
    skipped, never raised."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and "type" in event:
                yield event
