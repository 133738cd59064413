"""The event log reader: whole-file reads and the incremental tail used by --follow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sdp_cli.telemetry.events import EventLog, EventTail, parse_event_line, read_events


def test_parse_event_line_accepts_only_typed_objects() -> None:
    assert parse_event_line('{"ts": 1, "type": "capacity"}') == {"ts": 1, "type": "capacity"}
    for line in ("", "   ", "[1]", '"text"', '{"ts": 1}', '{"type": 3}', '{"type": "x"'):
        assert parse_event_line(line) is None, line


def test_read_events_survives_a_write_cut_inside_a_utf8_character(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps({"ts": 1.0, "type": "run_started", "run": "η"}, ensure_ascii=False)
    cut = json.dumps({"ts": 2.0, "type": "x", "note": "η"}, ensure_ascii=False).encode()[:-4]
    path.write_bytes(good.encode() + b"\n" + cut)
    assert [e["type"] for e in read_events(path)] == ["run_started"]


def test_tail_holds_back_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first = json.dumps({"ts": 1.0, "type": "a"}) + "\n"
    second = json.dumps({"ts": 2.0, "type": "b"}) + "\n"
    path.write_text(first + second[:7])
    tail = EventTail(path)
    assert [e["type"] for e in tail.poll().events] == ["a"]
    assert tail.poll().events == []
    with path.open("a") as handle:
        handle.write(second[7:])
    assert [e["type"] for e in tail.poll().events] == ["b"]
    assert tail.skipped_lines == 0


def test_tail_final_poll_counts_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": 1.0, "type": "a"}\nnot json\n{"ts": 2.0, "ty')
    tail = EventTail(path)
    read = tail.poll(final=True)
    assert [e["type"] for e in read.events] == ["a"]
    assert tail.skipped_lines == 2


def test_tail_restarts_when_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": 1.0, "type": "a"}\n{"ts": 2.0, "type": "b"}\n')
    tail = EventTail(path)
    assert len(tail.poll().events) == 2
    path.write_text('{"ts": 3.0, "type": "c"}\n')
    read = tail.poll()
    assert read.restarted
    assert [e["type"] for e in read.events] == ["c"]


def test_event_log_lines_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    with EventLog(path) as log:
        log.emit("batch_taken", step=0, head_lags=(0, 1), tokens_by_lag={"0": 3})
    (event,) = read_events(path)
    assert event["type"] == "batch_taken"
    assert event["head_lags"] == [0, 1]
    assert isinstance(event["ts"], float)


def test_tail_reads_lines_split_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"ts": float(i), "type": "capacity", "running": i}) for i in range(50)]
    path.write_text("\n".join(lines) + "\n")
    tail = EventTail(path)
    tail.CHUNK_BYTES = 7  # far shorter than a line
    assert [e["running"] for e in tail.poll().events] == list(range(50))
    assert tail.skipped_lines == 0


def test_telemetry_imports_no_other_sdp_part() -> None:
    code = (
        "import sys\n"
        "import sdp_cli.telemetry.dashboard, sdp_cli.telemetry.report, sdp_cli.telemetry.plot\n"
        "others = sorted(m for m in sys.modules if m.startswith('sdp_cli.')"
        " and not m.startswith(('sdp_cli.telemetry', 'sdp_cli.errors')))\n"
        "print(others, 'matplotlib' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Nothing but telemetry and errors; matplotlib only once a plot is asked for.
    assert result.stdout.strip() == "[] False"
