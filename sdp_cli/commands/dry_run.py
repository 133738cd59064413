"""`sdp train --dry-run`: the resolved config and the capacity plan for the first versions."""

from __future__ import annotations

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from sdp_cli.config import SdpConfig, config_to_yaml
from sdp_cli.rollout.capacity import capacity_plan


def capacity_table(cfg: SdpConfig, versions: int) -> Table:
    r = cfg.rollout
    table = Table(
        title=f"capacity plan (η={r.max_staleness}, B={r.batch_size}, "
        f"max_concurrent={r.max_concurrent}, strategy={r.strategy.value})"
    )
    for column in (
        "version",
        "(η+v+1)·B",
        "consumed before",
        "max in flight",
        "max buffered ahead",
    ):
        table.add_column(column, justify="right")
    for row in capacity_plan(
        max_staleness=r.max_staleness,
        batch_size=r.batch_size,
        max_concurrent=r.max_concurrent,
        versions=versions,
    ):
        table.add_row(
            *(
                str(row[k])
                for k in (
                    "version",
                    "staleness_limit",
                    "consumed_before",
                    "max_in_flight",
                    "max_buffered_ahead",
                )
            )
        )
    return table


def print_dry_run(cfg: SdpConfig, console: Console, checked: list[str]) -> None:
    console.print(
        Syntax(config_to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default")
    )
    for line in checked:
        console.print(f"checked: {line}", highlight=False, soft_wrap=True)
    console.print(
        f"completions per step: {cfg.rollout.batch_size} rollouts × {cfg.rollout.n_samples} samples"
        f" = {cfg.rollout.batch_size * cfg.rollout.n_samples}",
        highlight=False,
    )
    console.print(capacity_table(cfg, versions=min(cfg.train.steps, cfg.rollout.max_staleness + 3)))
