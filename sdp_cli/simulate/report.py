"""Rendering of `sdp simulate` results: Rich tables, or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


def to_json(result: dict[str, Any] | list[dict[str, Any]]) -> str:
    return json.dumps(result, sort_keys=False)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def summary_table(result: dict[str, Any]) -> Group:
    setup = Text(
        f"simulation: strategy={result['strategy']} η={result['max_staleness']} "
        f"B={result['batch_size']} max_concurrent={result['max_concurrent']} "
        f"n={result['n_samples']} servers={result['servers']} prox_mode={result['prox_mode']}",
        style="bold",
    )
    main = Table(show_header=False)
    main.add_column("metric")
    main.add_column("value", justify="right")
    dropped = ", ".join(f"{k} {v}" for k, v in result["dropped"].items()) or "none"
    rows = [
        ("steps / versions", f"{result['steps']} / {result['versions']}"),
        ("rollouts submitted", str(result["rollouts_submitted"])),
        ("accepted", str(result["accepted"])),
        ("rejected", str(result["rejected"])),
        ("dropped", f"{result['dropped_total']} ({dropped})"),
        ("consumed", str(result["consumed"])),
        (
            "in flight / buffered at end",
            f"{result['running_at_end']} / {result['buffered_at_end']}",
        ),
        ("max trained lag", str(result["max_trained_lag"])),
        ("trainer idle", _pct(result["trainer_idle_fraction"])),
        ("generator idle", _pct(result["generator_idle_fraction"])),
        ("rollouts trained / sim s", _num(result["samples_per_s"])),
        ("tokens trained / sim s", _num(result["tokens_per_s"])),
        ("segments aborted by updates", str(result["segments_aborted"])),
        ("recomputed tokens", str(result["recomputed_tokens"])),
        (
            "proximal violations / tokens checked",
            f"{result['proximal_violations']} / {result['proximal_checked_tokens']}",
        ),
        ("simulated time", f"{result['sim_time_s']:.3f} s"),
        ("wall time", f"{result['wall_s']:.3f} s"),
    ]
    for name, value in rows:
        main.add_row(name, value)
    examples = result["proximal_violation_examples"]
    if examples:
        # A violation is a bug in the update protocol or the recompute: say where it was.
        first = examples[0]
        main.add_row(
            "first proximal violation",
            f"step {first['step']} rollout {first['rollout_id']} position {first['position']}: "
            f"token of v{first['token_version']} scored under v{first['got_version']}, "
            f"the rule says v{first['expected_version']}",
            style="red",
        )
    lags = Table()
    lags.add_column("head lag", justify="right")
    lags.add_column("rollouts", justify="right")
    lags.add_column("tokens", justify="right")
    for lag, count in result["lag_histogram"].items():
        lags.add_row(lag, str(count), str(result["tokens_by_lag"].get(lag, 0)))
    return Group(setup, main, Text("trained rollouts by head lag (versions)", style="bold"), lags)


def sweep_table(key: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"sweep over {key} (rates per simulated second)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = (
        "value",
        "max lag",
        "drops",
        "train idle",
        "gen idle",
        "rollouts/s",
        "tokens/s",
        "sim s",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        tokens = row["tokens_per_s"]
        table.add_row(
            str(row["sweep"][key]),
            str(row["max_trained_lag"]),
            str(row["dropped_total"]),
            _pct(row["trainer_idle_fraction"]),
            _pct(row["generator_idle_fraction"]),
            _num(row["samples_per_s"]),
            "–" if tokens is None else f"{tokens:,.0f}",
            f"{row['sim_time_s']:.2f}",
        )
    return table


def print_result(result: dict[str, Any], console: Console) -> None:
    console.print(summary_table(result))


def print_sweep(key: str, rows: list[dict[str, Any]], console: Console) -> None:
    console.print(sweep_table(key, rows))
    checked = sum(row["proximal_checked_tokens"] for row in rows)
    violating = [row for row in rows if row["proximal_violations"]]
    if not violating:
        console.print(f"proximal violations: none in {checked:,} tokens checked")
    for row in violating:
        console.print(
            f"proximal violations at {key}={row['sweep'][key]}: {row['proximal_violations']} "
            f"of {row['proximal_checked_tokens']:,} tokens checked",
            style="red",
        )
