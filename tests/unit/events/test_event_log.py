"""The event log reader: whole-file reads and the incremental tail used by --follow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sdp_cli.events.event_log import (
    EventLog,
    EventTail,
    NullEventLog,
    event_line,
    keeps_events,
    parse_event_line,
    read_events,
)
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    RolloutSubmittedEvent,
    ServerStateEvent,
)


def submitted(rollout_id: int, ts: float = 1.0) -> str:
    return event_line(RolloutSubmittedEvent(ts=ts, rollout_id=rollout_id, version=0)) + "\n"


def test_parse_event_line_gives_the_typed_event_or_none() -> None:
    line = '{"ts": 1, "type": "rollout_submitted", "rollout_id": 4, "version": 0}'
    assert parse_event_line(line) == RolloutSubmittedEvent(ts=1.0, rollout_id=4, version=0)
    not_events = ("", "   ", "[1]", '"text"', '{"ts": 1}', '{"type": 3}', '{"type": "x"')
    unknown_or_misfit = ('{"type": "x"}', '{"type": "rollout_submitted", "version": 0}')
    for text in (*not_events, *unknown_or_misfit):
        assert parse_event_line(text) is None, text


def test_read_events_survives_a_write_cut_inside_a_utf8_character(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps(
        {"ts": 1.0, "type": "server_state", "server": 0, "address": "η:1", "state": "ready"},
        ensure_ascii=False,
    )
    cut = json.dumps({"ts": 2.0, "type": "x", "note": "η"}, ensure_ascii=False).encode()[:-4]
    path.write_bytes(good.encode() + b"\n" + cut)
    (event,) = read_events(path)
    assert isinstance(event, ServerStateEvent) and event.address == "η:1"


def test_tail_holds_back_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first, second = submitted(1), submitted(2)
    path.write_text(first + second[:7])
    tail = EventTail(path)
    assert [e.rollout_id for e in tail.poll().events] == [1]
    assert tail.poll().events == []
    with path.open("a") as handle:
        handle.write(second[7:])
    assert [e.rollout_id for e in tail.poll().events] == [2]
    assert tail.skipped_lines == 0


def test_tail_counts_unreadable_lines_and_unknown_types_apart(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        submitted(1) + "not json\n" + '{"ts": 1.5, "type": "from_the_future"}\n'
        '{"ts": 1.6, "type": "rollout_submitted", "rollout_id": "one", "version": 0}\n'
        '{"ts": 2.0, "ty'
    )
    tail = EventTail(path)
    read = tail.poll(final=True)
    assert [e.rollout_id for e in read.events] == [1]
    # Not JSON, a wrongly typed field, the truncated last line.
    assert tail.skipped_lines == 3
    assert tail.unknown_events == 1


def test_tail_restarts_when_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(submitted(1) + submitted(2))
    tail = EventTail(path)
    assert len(tail.poll().events) == 2
    path.write_text(submitted(3))
    read = tail.poll()
    assert read.restarted
    assert [e.rollout_id for e in read.events] == [3]


def test_event_log_lines_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    written = BatchTakenEvent(
        step=0,
        version=1,
        rollout_ids=[4, 5],
        head_lags=[0, 1],
        tail_lags=[0, 0],
        tokens_by_lag={"0": 3},
        wait_s=0,
    )
    with EventLog(path) as log:
        log.emit(written)
    (event,) = read_events(path)
    assert isinstance(event, BatchTakenEvent)
    assert isinstance(event.ts, float)
    assert event == BatchTakenEvent(**{**written.fields_dict(), "ts": event.ts})
    # An int where the schema says float is read back as a float.
    assert isinstance(event.wait_s, float)


def test_tail_reads_lines_split_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(submitted(i, ts=float(i)) for i in range(50)))
    tail = EventTail(path)
    tail.CHUNK_BYTES = 7  # far shorter than a line
    assert [e.rollout_id for e in tail.poll().events] == list(range(50))
    assert tail.skipped_lines == 0


def test_views_import_no_sdp_part_but_events() -> None:
    code = (
        "import sys\n"
        "import sdp_cli.views.dashboard, sdp_cli.views.staleness_report, sdp_cli.views.plot\n"
        "others = sorted(m for m in sys.modules if m.startswith('sdp_cli.')"
        " and not m.startswith(('sdp_cli.events', 'sdp_cli.views', 'sdp_cli.errors')))\n"
        "print(others, 'matplotlib' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Nothing but events, views and errors; matplotlib only once a plot is asked for.
    assert result.stdout.strip() == "[] False"


def test_only_the_null_sink_is_known_to_discard_events(tmp_path: Path) -> None:
    # Hot paths skip building events for it; every other sink gets them all.
    assert not keeps_events(NullEventLog())
    with EventLog(tmp_path / "events.jsonl") as log:
        assert keeps_events(log)
