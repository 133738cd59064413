"""`sdp init-model [NAME] [--dir DIR] [overrides]`: make a built-in model (a no-op if present).

NAME is a built-in model (`tiny`, `smollm2-135m`), never a directory, so a typo cannot write a
model somewhere unexpected; `--dir` chooses the directory instead of the model cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sdp_cli.config import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.model import BUILTIN_NAMES, builtin_name, init_builtin


def split_model_name(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional NAME among the arguments, and the overrides (every `key=value`)."""
    names = [a for a in items if "=" not in a]
    if len(names) > 1:
        raise SdpError(f"init-model takes at most one model NAME (got {names})")
    name = names[0] if names else None
    if name is not None and name not in BUILTIN_NAMES:
        raise SdpError(
            f"init-model knows no model '{name}'; NAME is one of {', '.join(BUILTIN_NAMES)}"
            f"\n  fix: to put a model in a directory, pass --dir: sdp init-model tiny --dir {name}"
        )
    return name, [a for a in items if "=" in a]


def init_model(
    items: list[str],
    load: Callable[[list[str]], SdpConfig],
    target_dir: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Make the named model; without a NAME, the built-in model the config selects (tiny by
    default)."""
    name, overrides = split_model_name(items)
    cfg = load(overrides)
    name = name or builtin_name(cfg.model.path) or "tiny"
    console = console or Console()
    start = time.perf_counter()
    result = init_builtin(name, cfg.model, target_dir)
    took = f" in {time.perf_counter() - start:.1f} s" if result.created else ""
    state = "created" if result.created else "already present"
    console.print(f"{name} {state}{took}: {result.path}", highlight=False, soft_wrap=True)
    return result.path
