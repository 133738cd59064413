"""`sdp inspect-staleness RUN_DIR`: find a run's log, summarize it, print it (text, JSON, plot,
live with --follow)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from rich.console import Console

from sdp_cli.views.staleness_report import (
    check_plot_target,
    follow_log,
    locate_event_log,
    read_summary,
    render_summary,
    write_json,
)


def inspect_staleness(
    run_dir: Path,
    *,
    follow: bool = False,
    as_json: bool = False,
    plot: Path | None = None,
    console: Console | None = None,
    out: TextIO | None = None,
) -> None:
    """Raises SdpError for anything the user can fix."""
    console = console or Console()
    out = out or sys.stdout
    log_path = locate_event_log(run_dir)
    if plot is not None:
        check_plot_target(plot)
    if follow:
        summary = follow_log(log_path, console=console, as_json=as_json, out=out)
    else:
        summary = read_summary(log_path)
        if as_json:
            write_json(summary, out)
        else:
            console.print(render_summary(summary, source=str(log_path)))
    if plot is not None and summary is not None:
        from sdp_cli.views.plot import write_plot

        write_plot(summary, plot)
        if not as_json:
            console.print(f"plot written to {plot}", highlight=False)
