"""The run log: one JSON object per line with `ts`, `type` and the event's fields.

Event types (DESIGN §7): run_started, rollout_submitted, rollout_finished, sample_dropped,
batch_taken, capacity, weight_update, server_state, train_step, run_finished; readers skip
types they do not know.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


def parse_event_line(line: str) -> dict[str, Any] | None:
    """One log line → its event, or None for a blank, truncated or foreign line."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        return event
    return None


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the events of a log. A truncated or unparsable line (a run killed mid-write) is
    skipped, never raised."""
    # errors="replace": a write cut inside a multi-byte character must not abort the read.
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            event = parse_event_line(line)
            if event is not None:
                yield event


@dataclass
class TailRead:
    events: list[dict[str, Any]]
    # True when the file shrank or was replaced: the caller must forget what it read before.
    restarted: bool = False


class EventTail:
    """Reads a growing log incrementally (`sdp inspect-staleness --follow`).

    Only complete lines are consumed: a line still being written is left for the next poll, so
    a live writer's half line is never mistaken for a corrupt one. `skipped_lines` counts
    complete lines that were not events. Reads in chunks, so a large log is never held twice."""

    CHUNK_BYTES = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self.skipped_lines = 0
        self.restarted = False

    def poll(self, *, final: bool = False) -> TailRead:
        """New events since the last poll. `final=True` also takes an unterminated last line
        (a finished or killed run will never complete it)."""
        events = list(self.iter_new(final=final))
        return TailRead(events, self.restarted)

    def iter_new(self, *, final: bool = False) -> Iterator[dict[str, Any]]:
        """Like poll, streaming. `restarted` is set once the file is opened."""
        with self.path.open("rb") as handle:
            size = handle.seek(0, 2)
            self.restarted = size < self._offset
            if self.restarted:
                self._offset = 0
                self.skipped_lines = 0
            handle.seek(self._offset)
            pending = b""
            while chunk := handle.read(self.CHUNK_BYTES):
                data = pending + chunk
                end = data.rfind(b"\n") + 1
                pending = data[end:]
                self._offset += end
                yield from self._parse(data[:end])
            if final and pending:
                self._offset += len(pending)
                yield from self._parse(pending)

    def _parse(self, data: bytes) -> Iterator[dict[str, Any]]:
        for raw in data.splitlines():
            if not raw.strip():
                continue
            event = parse_event_line(raw.decode("utf-8", errors="replace"))
            if event is None:
                self.skipped_lines += 1
            else:
                yield event
