"""The `log.*` keys: the dashboard and metrics backends."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sdp_cli.config.setting import setting


class LogBackend(StrEnum):
    tensorboard = "tensorboard"
    wandb = "wandb"


@dataclass
class LogConfig:
    """Where metrics go besides the event log, which is always written."""

    backends: list[str] = setting(
        factory=list,
        choices=tuple(b.value for b in LogBackend),
        help="metric backends: [] (events.jsonl only), [tensorboard], [wandb] or both",
    )
    wandb_project: str = setting("sdp", help="W&B project")
    wandb_mode: str = setting(
        "offline",
        choices=("offline", "online", "disabled"),
        help="W&B mode; offline writes run.dir/wandb and needs no network (wandb sync uploads)",
    )
    samples_per_step: int = setting(
        2, ge=0, help="trained completions per step written to run.dir/samples.jsonl; 0: none"
    )
    dropped_samples: bool = setting(
        True, help="also write dropped rollouts (with their reason) to samples.jsonl"
    )
    eval_samples: bool = setting(
        True,
        help="also write every held-out evaluation completion (kind eval) to samples.jsonl",
    )
