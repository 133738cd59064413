"""`sdp simulate`: one simulation, or one per value of a swept key, printed as text or JSON."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sdp_cli.config import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.simulate import parse_sweep, run_simulation, run_sweep
from sdp_cli.simulate.report import print_result, print_sweep, to_json
from sdp_cli.telemetry.events import EventLog

# Loads the config from the command's arguments plus the extra overrides given.
ConfigLoader = Callable[[list[str]], SdpConfig]


def simulate(
    load: ConfigLoader,
    *,
    as_json: bool = False,
    sweep: str | None = None,
    run_dir: Path | None = None,
    console: Console | None = None,
) -> None:
    """`run_dir`: write the run log RUN_DIR/events.jsonl (one simulation only)."""
    console = console or Console()
    if sweep is None:
        simulate_once(load([]), as_json, console, run_dir)
    elif run_dir is not None:
        raise SdpError("--run-dir writes the log of one simulation; it cannot go with --sweep")
    else:
        simulate_sweep(load, sweep, as_json, console)


def simulate_once(
    cfg: SdpConfig, as_json: bool, console: Console, run_dir: Path | None = None
) -> None:
    if run_dir is None:
        result = run_simulation(cfg)
    else:
        with EventLog(run_dir / "events.jsonl") as events:
            result = run_simulation(cfg, events)
    if as_json:
        sys.stdout.write(to_json(result) + "\n")
    else:
        print_result(result, console)


def simulate_sweep(load: ConfigLoader, sweep: str, as_json: bool, console: Console) -> None:
    key, values = parse_sweep(sweep)
    rows = run_sweep(load, key, values)
    if as_json:
        sys.stdout.write(to_json(rows) + "\n")
    else:
        print_sweep(key, rows, console)
