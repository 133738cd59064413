"""The run log: one JSON object per line with `ts`, `type` and the event's fields.

The event types and their fields are defined in `sdp_cli.events.event_schema`; this module writes
typed events to the log and reads them back. Readers skip types they do not know and lines
that are not complete events (a run killed mid-write).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sdp_cli.events.event_schema import Event, EventSchemaError, parse_event


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class NullEventLog:
    """Discards events (unit tests, simulations that keep no log)."""

    def emit(self, event: Event) -> None:
        return None


def keeps_events(sink: EventSink) -> bool:
    """False for a sink that discards every event: a hot path (a purge dropping thousands of
    samples, a simulation sweep) then skips building the events at all."""
    return not isinstance(sink, NullEventLog)


E = TypeVar("E", bound=Event)


class EventRecorder:
    """Keeps the events in memory (tests, and callers that inspect what a run emitted)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


def event_line(event: Event) -> str:
    """The log line of an event (without the newline); `ts` is now unless the event has one."""
    ts = time.time() if event.ts is None else event.ts
    return json.dumps({"ts": ts, "type": event.type, **event.fields_dict()}, default=_jsonable)


class EventLog:
    """Appends events to a JSONL file. Thread-safe; each line is flushed as it is written so
    `sdp inspect-staleness --follow` and the dashboard see a running run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")
        if _ends_mid_line(self.path):
            # A killed writer cut its last line: end it, so that this run's first event does
            # not join it on one unparsable line (a resumed run's run_started would be lost).
            self._file.write("\n")
            self._file.flush()

    def emit(self, event: Event) -> None:
        line = event_line(event)
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


def _ends_mid_line(path: Path) -> bool:
    with path.open("rb") as handle:
        if handle.seek(0, 2) == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):
        return value.value
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def parse_event_line(line: str) -> Event | None:
    """One log line → its typed event, or None for a blank, truncated or foreign line, an
    unknown type, or a known type whose fields do not fit the schema."""
    try:
        return parse_line(line)
    except (UnknownEventType, EventSchemaError):
        return None


class UnknownEventType(Exception):
    """A well-formed event whose type this sdp does not know (a newer sdp wrote it)."""


def parse_line(line: str) -> Event | None:
    """Like parse_event_line, but raises UnknownEventType or EventSchemaError so a reader can
    tell them apart; None only for a blank or non-JSON line."""
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    event = parse_event(data)
    if event is None:
        raise UnknownEventType(data["type"])
    return event


def read_events(path: Path) -> Iterator[Event]:
    """Yield the typed events of a log. Unknown types and lines that are not complete events
    (a run killed mid-write) are skipped, never raised."""
    # errors="replace": a write cut inside a multi-byte character must not abort the read.
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            event = parse_event_line(line)
            if event is not None:
                yield event


@dataclass
class TailRead:
    events: list[Event]
    # True when the file shrank or was replaced: the caller must forget what it read before.
    restarted: bool = False


class EventTail:
    """Reads a growing log incrementally (`sdp inspect-staleness --follow`).

    Only complete lines are consumed: a line still being written is left for the next poll, so
    a live writer's half line is never mistaken for a corrupt one. `skipped_lines` counts
    complete lines that were not events (or did not fit the schema), `unknown_events` the
    events of types this sdp does not know. Reads in chunks, so a large log is never held
    twice."""

    CHUNK_BYTES = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self.skipped_lines = 0
        self.unknown_events = 0
        self.restarted = False

    def poll(self, *, final: bool = False) -> TailRead:
        """New events since the last poll. `final=True` also takes an unterminated last line
        (a finished or killed run will never complete it)."""
        events = list(self.iter_new(final=final))
        return TailRead(events, self.restarted)

    def iter_new(self, *, final: bool = False) -> Iterator[Event]:
        """Like poll, streaming. `restarted` is set once the file is opened."""
        with self.path.open("rb") as handle:
            size = handle.seek(0, 2)
            self.restarted = size < self._offset
            if self.restarted:
                self._offset = 0
                self.skipped_lines = 0
                self.unknown_events = 0
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

    def _parse(self, data: bytes) -> Iterator[Event]:
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                event = parse_line(raw.decode("utf-8", errors="replace"))
            except UnknownEventType:
                self.unknown_events += 1
                continue
            except EventSchemaError:
                event = None
            if event is None:
                self.skipped_lines += 1
            else:
                yield event
