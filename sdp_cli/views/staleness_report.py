"""The staleness report of a run log: find the log, summarize it, render it as text, JSON or a
live view (the `sdp inspect-staleness` command is commands/inspect_staleness.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import EventTail, TailRead
from sdp_cli.views.event_fold import DROP_REASONS, RunFold
from sdp_cli.views.health_view import health_table
from sdp_cli.views.staleness_analysis import (
    StalenessSummary,
    VersionRow,
    staleness_summary,
)
from sdp_cli.views.widgets import bar, format_duration, lag_histogram

EVENTS_FILE = "events.jsonl"
FOLLOW_POLL_S = 1.0
# In --follow the view must fit a terminal, so the per-version table keeps its newest rows.
FOLLOW_VERSION_ROWS = 12
ADVICE_TITLES = {
    "tight": "tight bound",
    "loose": "loose bound",
    "bound_exceeded": "bound exceeded",
    "health": "off-policy health",
}


def locate_event_log(run_dir: Path) -> Path:
    """RUN_DIR/events.jsonl; the log file itself is accepted too."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.exists():
        raise SdpError(
            f"run directory not found: {path}\n  runs are written to runs/<run.name>/ "
            f"(see run.dir in `sdp config show`)"
        )
    if not path.is_dir():
        raise SdpError(f"{path} is neither a run directory nor an event log")
    log_path = path / EVENTS_FILE
    if not log_path.is_file():
        raise SdpError(
            f"no {EVENTS_FILE} in {path}: not a run directory, or the run has not started "
            f"logging yet"
        )
    return log_path


def read_summary(log_path: Path) -> StalenessSummary:
    tail = EventTail(log_path)
    fold = RunFold()
    try:
        fold.add_all(tail.iter_new(final=True))
    except OSError as exc:
        raise _read_error(tail, exc) from None
    summary = staleness_summary(
        fold, skipped_lines=tail.skipped_lines, unknown_events=tail.unknown_events
    )
    if summary.known_events == 0:
        raise SdpError(_nothing_to_show(log_path, summary))
    return summary


def follow_log(
    log_path: Path, *, console: Console, as_json: bool, out: TextIO
) -> StalenessSummary | None:
    """Re-read the growing log every FOLLOW_POLL_S until Ctrl-C, which ends it normally."""
    tail = EventTail(log_path)
    fold = RunFold()
    summary: StalenessSummary | None = None
    waiting = Text(f"waiting for events in {log_path} … (Ctrl-C to stop)", style="dim")
    live = None if as_json else Live(waiting, console=console, auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while True:
            read = _poll(tail, final=False)
            if read.restarted:
                fold = RunFold()
            if read.events or read.restarted or summary is None:
                fold.add_all(read.events)
                summary = staleness_summary(
                    fold, skipped_lines=tail.skipped_lines, unknown_events=tail.unknown_events
                )
                _show_follow_update(summary, live, as_json=as_json, out=out, source=log_path)
            _sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return summary if summary is not None and summary.known_events else None


def _show_follow_update(
    summary: StalenessSummary, live: Live | None, *, as_json: bool, out: TextIO, source: Path
) -> None:
    if summary.known_events == 0:
        return
    if as_json or live is None:
        write_json(summary, out)
        return
    live.update(
        render_summary(summary, source=str(source), max_version_rows=FOLLOW_VERSION_ROWS),
        refresh=True,
    )


def write_json(summary: StalenessSummary, out: TextIO) -> None:
    out.write(json.dumps(_rounded(summary.to_dict())) + "\n")
    out.flush()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _poll(tail: EventTail, *, final: bool) -> TailRead:
    try:
        return tail.poll(final=final)
    except OSError as exc:
        raise _read_error(tail, exc) from None


def _read_error(tail: EventTail, exc: OSError) -> SdpError:
    if isinstance(exc, FileNotFoundError):
        return SdpError(f"{tail.path} disappeared while reading it")
    return SdpError(f"cannot read {tail.path}: {exc.strerror or exc}")


def _nothing_to_show(log_path: Path, summary: StalenessSummary) -> str:
    if summary.events == 0 and summary.skipped_lines == 0:
        return f"{log_path} is empty: the run has not logged any event yet (try --follow)"
    return (
        f"{log_path} holds no sdp events ({summary.events} events of unknown types, "
        f"{summary.skipped_lines} unreadable lines or events that do not fit the schema): "
        f"is it an sdp run log?"
    )


def check_plot_target(plot: Path) -> None:
    # Checked before reading, so a long --follow session does not end in an unwritable path.
    if plot.exists() and plot.is_dir():
        raise SdpError(f"--plot {plot} is a directory; give a file name such as staleness.png")
    if not plot.parent.exists():
        raise SdpError(f"--plot {plot}: directory {plot.parent} does not exist")


def _rounded(value: Any) -> Any:
    """Float sums like 2.0999999999999996 become 2.1 in the JSON output."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# --- rendering --------------------------------------------------------------------------------


def render_summary(
    summary: StalenessSummary, *, source: str = "", max_version_rows: int | None = None
) -> RenderableType:
    parts: list[RenderableType] = [
        _report_header(summary, source),
        _version_table(summary, max_version_rows),
        _histograms(summary),
        _drops_and_time(summary),
    ]
    update_line = _weight_update_line(summary)
    if update_line is not None:
        parts.append(update_line)
    trouble = _server_trouble(summary)
    if trouble is not None:
        parts.append(trouble)
    if summary.evals:
        parts.append(_eval_accuracy_line(summary))
    if summary.curriculum:
        parts.append(_curriculum_line(summary))
    if summary.episodes:
        parts.append(episodes_line(summary.episodes))
    if summary.health:
        parts.append(
            health_table(summary.health, summary.health_by_lag, "off-policy health by lag")
        )
    parts.extend(_advice_panels(summary))
    if summary.skipped_lines:
        parts.append(
            Text(
                f"note: skipped {summary.skipped_lines} line(s) that are not complete events "
                f"of the event schema (a write cut short when the run was killed?)",
                style="dim",
            )
        )
    return Group(*parts)


def episodes_line(episodes: dict[str, Any]) -> Text:
    """Multi-turn runs: turns per episode, generation against environment seconds, ends."""
    ends = ", ".join(f"{reason} {n}" for reason, n in episodes.get("ends", {}).items())
    return Text(
        f"episodes {episodes['episodes']}: {episodes['turns_per_episode']:.2f} model turns "
        f"and {episodes.get('tool_calls_per_episode', 0.0):.2f} tool results each; "
        f"generation {episodes['generate_s']:.1f}s, environment {episodes['env_s']:.1f}s "
        f"({episodes['env_fraction']:.0%} of episode time); ended: {ends}"
    )


def _eval_accuracy_line(summary: StalenessSummary) -> RenderableType:
    """Held-out accuracy at each evaluation, oldest first."""
    points = " → ".join(f"{row['accuracy']:.3f} (step {row['step']})" for row in summary.evals[-8:])
    last = summary.evals[-1]
    return Text(
        f"eval accuracy ({last['n_prompts']} held-out prompts): {points}; "
        f"last pass@{last['k']} {last['pass_at_k']:.3f}"
    )


def _curriculum_line(summary: StalenessSummary) -> RenderableType:
    """task.curriculum: the level now, and from which step and data position each held."""
    levels = " → ".join(
        f"{row['level']} (step {row['step']}, position {row['position']})"
        for row in summary.curriculum[-8:]
    )
    return Text(f"curriculum level {summary.curriculum[-1]['level']}: {levels}")


def _report_header(summary: StalenessSummary, source: str) -> RenderableType:
    run = summary.run
    eta = summary.max_staleness
    settings = [
        f"run {run.get('run', '?')}",
        f"strategy {run.get('strategy', '?')}",
        f"η={eta if eta is not None else '?'}",
        f"B={run.get('batch_size', '?')}",
        f"max_concurrent={run.get('max_concurrent', '?')}",
        f"prox_mode {run.get('prox_mode', '?')}",
        f"servers {run.get('server_count', '?')}",
    ]
    state = (
        f"finished in {format_duration(summary.time.wall_s)}"
        if summary.finished
        else f"running (or stopped) after {format_duration(summary.time.wall_s)}"
    )
    planned = f"/{summary.planned_steps}" if summary.planned_steps is not None else ""
    max_lag = summary.max_trained_lag
    totals = (
        f"steps {summary.steps}{planned} · submitted {summary.submitted} · accepted "
        f"{summary.accepted} · rejected {summary.rejected} · dropped {summary.dropped_total} · "
        f"consumed {summary.consumed} · max trained head lag "
        f"{max_lag if max_lag is not None else '—'}"
    )
    lines = Text()
    lines.append("staleness of ", style="bold")
    lines.append(source or "run", style="bold cyan")
    lines.append(f"  ({state})\n", style="dim")
    lines.append(" · ".join(settings) + "\n")
    lines.append(totals)
    return lines


def _version_table(summary: StalenessSummary, max_rows: int | None) -> RenderableType:
    rows = summary.per_version
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        hidden = len(rows) - max_rows
        rows = rows[-max_rows:]
    reasons = list(DROP_REASONS) + [r for r in summary.dropped_by_reason if r not in DROP_REASONS]
    caption = (
        "limit = (η+v+1)·B; cap = min(conc room, stale room) as last logged at v; "
        "head/tail = lag of trained samples"
    )
    if hidden:
        caption += f"; {hidden} older versions not shown"
    table = Table(
        title="per version",
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0, 0, 1),
        show_edge=False,
    )
    headers = ["v", "limit", "conc\nroom", "stale\nroom", "cap", "sub", "acc"]
    headers += ["rej", *(f"drop\n{_short_reason(r)}" for r in reasons), "cons"]
    headers += ["head\nμ/max", "tail\nμ/max"]
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            str(row.version),
            _term(row, "staleness_limit"),
            _term(row, "concurrency_room"),
            _term(row, "staleness_room"),
            _term(row, "capacity"),
            str(row.submitted),
            str(row.accepted),
            str(row.rejected),
            *(str(row.dropped_by_reason.get(r, 0)) for r in reasons),
            str(row.consumed),
            _lag_cell(row.head_lag_mean, row.head_lag_max),
            _lag_cell(row.tail_lag_mean, row.tail_lag_max),
        )
    return table


def _short_reason(reason: str) -> str:
    return {"head_lag": "lag", "no_recompute": "no_rc", "uninformative": "uninf"}.get(
        reason, reason
    )


def _term(row: VersionRow, key: str) -> str:
    value = row.capacity.get(key) if row.capacity else None
    return str(value) if value is not None else "—"


def _lag_cell(mean: float | None, peak: int | None) -> str:
    if mean is None or peak is None:
        return "—"
    return f"{mean:.2f}/{peak}"


def _histograms(summary: StalenessSummary) -> RenderableType:
    return Columns(
        [
            Panel(
                lag_histogram(summary.lag_histogram, unit="samples", width=12),
                title="trained samples by head lag",
                title_align="left",
                expand=False,
            ),
            Panel(
                lag_histogram(summary.tokens_by_lag, unit="tokens", width=12, style="magenta"),
                title="trained tokens by lag",
                title_align="left",
                expand=False,
            ),
        ]
    )


def _drops_and_time(summary: StalenessSummary) -> RenderableType:
    return Columns([_drops_table(summary), _time_table(summary)], padding=(0, 3))


def _drops_table(summary: StalenessSummary) -> RenderableType:
    points = ["finish", "purge", "take"]
    points += [p for p in summary.dropped_by_point if p not in points]
    reasons = list(summary.dropped_by_reason) or list(DROP_REASONS)
    table = Table(
        title="drops (reason × point)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    table.add_column("reason", no_wrap=True)
    for point in points:
        table.add_column(point, justify="right")
    table.add_column("total", justify="right", style="bold")
    for reason in reasons:
        by_point = summary.drop_matrix.get(reason, {})
        cells = [str(by_point.get(p, 0)) for p in points]
        table.add_row(reason, *cells, str(summary.dropped_by_reason.get(reason, 0)))
    return table


def _time_table(summary: StalenessSummary) -> RenderableType:
    split = summary.time
    table = Table(title="trainer time", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("s", justify="right")
    table.add_column("share", justify="right")
    for label, seconds, style in (
        ("waiting for samples", split.wait_s, "yellow"),
        ("training", split.train_s, "green"),
        ("updating weights", split.weight_update_s, "blue"),
    ):
        share = split.share(seconds)
        table.add_row(
            label,
            bar(seconds, split.busy_s, 10, style),
            f"{seconds:.1f}",
            f"{share:.0%}" if share is not None else "—",
        )
    return table


def _weight_update_line(summary: StalenessSummary) -> RenderableType | None:
    if not summary.weight_updates:
        return None
    n = summary.weight_updates
    phases = " · ".join(
        f"{name.removesuffix('_s')} {seconds / n:.2f}"
        for name, seconds in summary.weight_update_phases.items()
    )
    pause = summary.pause_per_update
    paused = (
        f"\npause per update ({pause['mode']}): mean {pause['mean_s']:.3f} s, "
        f"max {pause['max_s']:.3f} s"
        if pause
        else ""
    )
    return Text(
        f"{n} weight updates, mean {summary.time.weight_update_s / n:.2f} s"
        + (f" ({phases})" if phases else "")
        + paused,
        style="dim",
    )


def _server_trouble(summary: StalenessSummary) -> RenderableType | None:
    """Rejections by reason, poison requests and every server restart with what it died of."""
    if not summary.server_incidents and not summary.rejected:
        return None
    text = Text()
    if summary.rejected:
        reasons = ", ".join(f"{n} {reason}" for reason, n in summary.rejected_by_reason.items())
        text.append(f"rejected rollouts: {reasons}\n")
    if summary.poison_requests:
        text.append(
            f"{summary.poison_requests} poison request(s): servers died twice while serving "
            "them, so their rollouts were left out and the run went on\n",
            style="yellow",
        )
        for error in summary.poison_errors[-2:]:
            text.append(f"  {error[:240]}\n", style="dim")
    for incident in summary.server_incidents:
        text.append(
            f"server {incident['server']} {incident['state']} "
            f"(restarts {incident['restarts']}): {incident['reason']}\n",
            style="red" if incident["state"] == "dead" else "yellow",
        )
    text.rstrip()
    return text


def _advice_panels(summary: StalenessSummary) -> list[RenderableType]:
    if not summary.advice:
        if summary.batches:
            return [Text("bound looks balanced: no long waits, few drops.", style="green")]
        return []
    return [
        Panel(
            Text(advice.message),
            title=f"warning: {ADVICE_TITLES.get(advice.kind, advice.kind)}",
            title_align="left",
            border_style="red" if advice.kind == "bound_exceeded" else "yellow",
        )
        for advice in summary.advice
    ]
