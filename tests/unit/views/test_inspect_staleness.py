"""`sdp inspect-staleness` on the small run of small_run.py, a 4-step run built through the
event schema so every number can be computed by hand, and on the log `sdp simulate --run-dir`
writes where no number is checked by hand.

The log (η=2, B=2, max_concurrent=4, segment_wise): rollouts 1-6 submitted at v0, 7-8 at v1,
9-11 at v2. Batches: [1,2] at v0 (head lags 0,0), [3,5] at v1 (1,1), [7,8] at v2 (1,1),
[9,11] at v3 (1,1). Rollout 6 is dropped at the v2 purge (no_recompute); rollout 4 finishes at
v3 with head lag 3 and is dropped (both a rollout_finished with reason head_lag and a
sample_dropped are logged: one drop); rollout 10 is rejected by the workflow. Trainer time:
waits 3.0+1.0+1.5+1.2 = 6.7 s, steps 4 × 1.0 s, weight updates 0.8+0.6+0.7 = 2.1 s. The log also
holds one event of an unknown type and ends with a truncated line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import event_line
from sdp_cli.events.event_schema import RunStartedEvent
from sdp_cli.views import staleness_report as report

runner = CliRunner()


@pytest.fixture
def run_dir(small_run_log: Path) -> Path:
    return small_run_log.parent


@pytest.fixture
def simulated_run_dir(simulated_run_log: Path) -> Path:
    """A run directory `sdp simulate --run-dir` wrote (read only: shared by the session)."""
    return simulated_run_log.parent


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["inspect-staleness", *args])
    return result.exit_code, result.output


def test_json_numbers_match_the_hand_computed_ones(run_dir: Path) -> None:
    code, output = invoke(str(run_dir), "--json")
    assert code == 0, output
    data = json.loads(output)

    assert data["steps"] == 4
    assert data["finished"] is True
    assert data["submitted"] == 11
    assert data["accepted"] == 9
    assert data["rejected"] == 1
    assert data["dropped_total"] == 2
    assert data["dropped_by_reason"] == {"head_lag": 1, "no_recompute": 1}
    assert data["dropped_by_point"] == {"finish": 1, "purge": 1}
    assert data["consumed"] == 8
    assert data["max_trained_lag"] == 1
    assert data["lag_histogram"] == {"0": 2, "1": 6}
    assert data["tail_lag_histogram"] == {"0": 8}
    # 22 | 14+12 | 16+10 | 9+9 tokens at lags 0|1 over the four batches.
    assert data["tokens_by_lag"] == {"0": 61, "1": 31}
    assert data["trained_tokens"] == 92

    assert data["time"]["wait_s"] == pytest.approx(6.7)
    assert data["time"]["train_s"] == pytest.approx(4.0)
    assert data["time"]["weight_update_s"] == pytest.approx(2.1)
    assert data["time"]["wall_s"] == pytest.approx(13.9)
    assert data["time"]["wait_share"] == pytest.approx(6.7 / 12.8, abs=1e-6)
    assert data["weight_updates"] == 3
    assert data["weight_update_phases"]["export_s"] == pytest.approx(0.9)
    assert data["weight_update_phases"]["recompute_s"] == pytest.approx(0.35)

    # Capacity events with no room: concurrency exhausted at 1001.5, 1003.9, 1008.7, 1009.6;
    # staleness exhausted at 1003.9, 1006.7, 1009.6.
    assert data["capacity_exhausted"] == {"concurrency": 4, "staleness": 3}
    assert data["events"] == 53
    assert data["known_events"] == 52
    assert data["skipped_lines"] == 1


def test_json_per_version_rows(run_dir: Path) -> None:
    data = json.loads(invoke(str(run_dir), "--json")[1])
    rows = {row["version"]: row for row in data["per_version"]}
    assert sorted(rows) == [0, 1, 2, 3]

    expected = {
        # version: submitted, accepted, rejected, dropped_by_reason, consumed, head mean/max
        0: (6, 2, 0, {}, 2, 0.0, 0),
        1: (2, 3, 0, {}, 2, 1.0, 1),
        2: (3, 2, 0, {"no_recompute": 1}, 2, 1.0, 1),
        3: (0, 2, 1, {"head_lag": 1}, 2, 1.0, 1),
    }
    for version, (sub, acc, rej, drops, cons, head_mean, head_max) in expected.items():
        row = rows[version]
        assert row["submitted"] == sub, version
        assert row["accepted"] == acc, version
        assert row["rejected"] == rej, version
        assert row["dropped_by_reason"] == drops, version
        assert row["dropped"] == sum(drops.values()), version
        assert row["consumed"] == cons, version
        assert row["head_lag_mean"] == head_mean, version
        assert row["head_lag_max"] == head_max, version
        assert row["tail_lag_max"] == 0, version

    # Last capacity event of each version: (η+v+1)·B = 6, 8, 10, 12.
    assert rows[0]["capacity"] == {
        "max_concurrent": 4,
        "running": 4,
        "accepted_live": 2,
        "staleness_limit": 6,
        "concurrency_room": 0,
        "staleness_room": 0,
        "capacity": 0,
    }
    assert rows[1]["capacity"]["concurrency_room"] == 1
    assert rows[3]["capacity"]["staleness_limit"] == 12
    assert rows[3]["capacity"]["capacity"] == 4
    assert [rows[v]["peak_running"] for v in range(4)] == [4, 3, 4, 0]


def test_warnings_name_the_knobs(run_dir: Path) -> None:
    data = json.loads(invoke(str(run_dir), "--json")[1])
    warnings = {w["kind"]: w for w in data["warnings"]}
    assert set(warnings) == {"tight", "loose"}
    # The trainer waited 52% of its time, mostly on the concurrency bound.
    assert warnings["tight"]["knobs"][:2] == ["rollout.max_concurrent", "server.count"]
    assert "52%" in warnings["tight"]["message"]
    # 2 of 11 rollouts dropped; with the trainer also waiting only η helps both.
    assert warnings["loose"]["knobs"] == ["rollout.max_staleness"]
    assert "2 of 11" in warnings["loose"]["message"]


def test_text_report_shows_every_section(run_dir: Path) -> None:
    code, output = invoke(str(run_dir))
    assert code == 0, output
    for text in (
        "per version",
        "trained samples by head lag",
        "trained tokens by lag",
        "drops (reason × point)",
        "trainer time",
        "waiting for samples",
        "warning: tight bound",
        "warning: loose bound",
        "rollout.max_concurrent",
        "3 weight updates",
        "skipped 1 line",
    ):
        assert text in output, text
    assert "6 samples" in output  # lag 1 row of the head-lag histogram
    assert "61 tokens" in output


def test_the_log_file_itself_is_accepted(simulated_run_dir: Path) -> None:
    code, output = invoke(str(simulated_run_dir / "events.jsonl"), "--json")
    assert code == 0
    assert json.loads(output)["steps"] == 6  # train.steps of SIMULATED_RUN_OVERRIDES
    assert json.loads(output) == json.loads(invoke(str(simulated_run_dir), "--json")[1])


def test_plot_writes_a_png(simulated_run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "staleness.png"
    code, output = invoke(str(simulated_run_dir), "--plot", str(target))
    assert code == 0, output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in output


def test_plot_without_matplotlib_is_a_clear_error(
    simulated_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes `import matplotlib...` raise ImportError, as if it were not installed.
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, output = invoke(str(simulated_run_dir), "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert "matplotlib" in output and "pip install" in output
    assert "Traceback" not in output
    assert not (tmp_path / "x.png").exists()


def test_plot_into_a_missing_directory_fails_before_reading(
    simulated_run_dir: Path, tmp_path: Path
) -> None:
    code, output = invoke(str(simulated_run_dir), "--plot", str(tmp_path / "nope" / "x.png"))
    assert code == 2
    assert "does not exist" in output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "run directory not found"),
        (lambda root: _mkdir(root / "no-log"), "no events.jsonl"),
        (lambda root: _log(root / "empty", ""), "is empty"),
        (lambda root: _log(root / "blank", "\n\n"), "is empty"),
        (lambda root: _log(root / "foreign", '{"type": "other"}\n[1, 2]\n'), "no sdp events"),
        (lambda root: _log(root / "cut", '{"ts": 1.0, "type": "run_sta'), "no sdp events"),
    ],
    ids=["missing-dir", "no-events-file", "empty", "blank-lines", "foreign", "only-truncated"],
)
def test_bad_inputs_exit_2_with_a_message(tmp_path: Path, make, message: str) -> None:
    target = make(tmp_path)
    for extra in ([], ["--json"]):
        code, output = invoke(str(target), *extra)
        assert code == 2, output
        assert message in output
        assert "Traceback" not in output


def test_lines_that_are_not_events_of_the_schema_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [
        event_line(
            RunStartedEvent(
                ts=1.0,
                run="r",
                steps=2,
                max_staleness=1,
                batch_size=1,
                strategy="segment_wise",
                prox_mode="segment",
                n_samples=1,
                max_concurrent=2,
                server_count=1,
            )
        ),
        "not json at all",
        json.dumps({"ts": 2.0, "type": "batch_taken", "version": 0, "head_lags": [0, "x", None]}),
        json.dumps({"ts": 3.0, "type": "train_step"}),  # every field missing
        json.dumps(
            {
                "ts": 4.0,
                "type": "batch_taken",
                "version": 0,
                "rollout_ids": [0],
                "head_lags": [0],
                "tail_lags": [0],
                "tokens_by_lag": {"0": 5},
                "wait_s": 0.5,
            }
        ),  # no step: a log written before batch_taken carried it
        json.dumps({"ts": 5.0, "type": "train_step", "step": 0, "version": 0}),  # older: sparse
        json.dumps({"ts": 6.0, "type": "capacity", "version": "zero", "capacity": None}),
        '{"ts": 7.0, "type": "train_step", "step": 1, "loss": 0.5, "rew',
    ]
    run = _log(tmp_path / "run", "\n".join(lines))
    code, output = invoke(str(run), "--json")
    assert code == 0, output
    data = json.loads(output)
    assert data["steps"] == 1
    assert data["lag_histogram"] == {"0": 1}
    assert data["tokens_by_lag"] == {"0": 5}
    # Not JSON, a wrong type, missing required fields (twice), the cut line.
    assert data["skipped_lines"] == 5
    code, output = invoke(str(run))
    assert code == 0 and "Traceback" not in output
    assert "skipped 5 line(s)" in output


def test_follow_refreshes_until_ctrl_c(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = run_dir / "events.jsonl"
    complete = log.read_text().splitlines(keepends=True)[:-1]  # without the cut line
    log.write_text("".join(complete[:10]) + complete[10][:15])  # ends mid-line
    polls: list[int] = []

    def fake_sleep(seconds: float) -> None:
        polls.append(1)
        if len(polls) == 1:
            # The writer finishes the line and the rest of the run before the next poll.
            log.write_text("".join(complete))
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "_sleep", fake_sleep)
    code, output = invoke(str(run_dir), "--follow", "--json")
    assert code == 0, output
    snapshots = [json.loads(line) for line in output.splitlines()]
    assert len(snapshots) == 2
    # The half-written line was not consumed (nor counted as garbage) before it was complete.
    assert snapshots[0]["skipped_lines"] == 0
    assert snapshots[0]["steps"] == 0
    assert snapshots[1]["steps"] == 4
    assert snapshots[1]["dropped_total"] == 2
    assert snapshots[1]["skipped_lines"] == 0


def test_follow_text_mode_ends_cleanly(
    simulated_run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_sleep", interrupt)
    code, output = invoke(str(simulated_run_dir), "--follow")
    assert code == 0, output
    assert "per version" in output
    assert "Traceback" not in output


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _log(run: Path, text: str) -> Path:
    run.mkdir()
    (run / "events.jsonl").write_text(text)
    return run
