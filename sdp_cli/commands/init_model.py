"""`sdp init-model [DIR] [overrides]`: create the built-in tiny model (a no-op if present)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sdp_cli.config import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.model import TinyModelSpec, init_tiny_model, resolve_model_path


def split_target_dir(items: list[str]) -> tuple[Path | None, list[str]]:
    """The optional DIR among the arguments, and the overrides (every `key=value`)."""
    dirs = [a for a in items if "=" not in a]
    if len(dirs) > 1:
        raise SdpError(f"init-model takes at most one DIR (got {dirs})")
    return (Path(dirs[0]) if dirs else None), [a for a in items if "=" in a]


def init_model(
    items: list[str], load: Callable[[list[str]], SdpConfig], console: Console | None = None
) -> Path:
    target, overrides = split_target_dir(items)
    cfg = load(overrides)
    path, created = init_tiny_model(
        TinyModelSpec.from_config(cfg.model), target or resolve_model_path(cfg.model)
    )
    (console or Console()).print(
        f"{'created' if created else 'already present'}: {path}", highlight=False
    )
    return path
