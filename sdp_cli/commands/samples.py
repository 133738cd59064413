"""`sdp samples RUN_DIR`: the completions a run trained on, dropped and evaluated, as a person
reads them.
An episode shows its turns, one line each: role, whether it is trained, its tokens and text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdp_cli.errors import SdpError
from sdp_cli.orchestrator.sample_log import SAMPLES_FILE, read_samples


def locate_samples(run_dir: Path) -> Path:
    path = run_dir if run_dir.is_file() else run_dir / SAMPLES_FILE
    if not path.exists():
        raise SdpError(
            f"no {SAMPLES_FILE} in '{run_dir}': it is written by sdp train when "
            "log.samples_per_step > 0"
        )
    return path


def show_samples(
    run_dir: Path,
    *,
    last: int = 10,
    kind: str | None = None,
    step: int | None = None,
    console: Console | None = None,
) -> None:
    """The `last` records (optionally only `trained`, `dropped` or `eval` ones, or one
    step's)."""
    console = console or Console()
    records = [
        r
        for r in read_samples(locate_samples(run_dir))
        if (kind is None or r.get("kind") == kind) and (step is None or r.get("step") == step)
    ]
    table = Table(show_lines=True, title=f"{len(records[-last:])} of {len(records)} samples")
    for column in ("kind", "step/v", "prompt", "completion", "reward", "versions", "lag"):
        table.add_column(column, overflow="fold")
    for record in records[-last:]:
        what = record.get("kind", "?")
        if what == "dropped":
            what = f"dropped ({record.get('reason')} at {record.get('point')})"
        table.add_row(
            what,
            f"{record.get('step', '—')}/v{record.get('version')}",
            str(record.get("prompt")),
            completion_cell(record),
            f"{record.get('reward', 0.0):.3f}",
            " ".join(f"v{v}[{a}:{b}]" for v, a, b in record.get("version_spans", [])),
            f"head {record.get('head_lag')} tail {record.get('tail_lag')}",
        )
    console.print(table)


def completion_cell(record: dict[str, Any]) -> str:
    """The completion, or an episode's turns (`assistant*` marks a trained one) and why it
    ended."""
    turns = record.get("turns")
    if not isinstance(turns, list):
        return str(record.get("completion"))
    lines = [
        f"{turn.get('role')}{'*' if turn.get('trained') else ''} ({turn.get('n_tokens')}): "
        f"{turn.get('text')}"
        for turn in turns
        if isinstance(turn, dict)
    ]
    lines.append(
        f"[ended: {record.get('end_reason')}; env {record.get('env_s') or 0.0:.2f}s, "
        f"generation {record.get('generate_s') or 0.0:.2f}s]"
    )
    # Texts are the model's and the environment's: never Rich markup.
    return escape("\n".join(lines))
