"""LoRA adapters on the servers (`train.lora.rank > 0`): one adapter name per weight version,
and which loaded adapters a server may drop.

A server holds the frozen base model and loads each version's adapter under its own name
(`POST /v1/load_lora_adapter`); a request uses an adapter by naming it as its `"model"`. A
request keeps the adapter it named from its first token to its last, whatever the server
loads meanwhile, so the adapter's version is the version of every token it returns. Names
carry a prefix unique to the process that made the pool: a server attached from another run
may hold an adapter of the same version with other weights.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping

from sdp_cli.inference.protocol import SERVED_MODEL_NAME

_NAME = re.compile(r"^.+-lora-[0-9a-f]+-v(\d+)$")


def adapter_prefix() -> str:
    """A fresh prefix for the adapter names of one run's pool."""
    return f"{SERVED_MODEL_NAME}-lora-{uuid.uuid4().hex[:8]}"


def adapter_name(prefix: str, version: int) -> str:
    return f"{prefix}-v{version}"


def adapter_version(name: object) -> int | None:
    """The version an adapter name stands for; None for any other model name (the base)."""
    if not isinstance(name, str):
        return None
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def adapters_to_unload(
    loaded: Iterable[str], current: str | None, in_flight: Mapping[str, int]
) -> list[str]:
    """The adapters a server may drop: every one it loaded but the current version's and
    those that requests still running (or on their way) named. The others stay until a later
    update finds them unused."""
    return [name for name in loaded if name != current and in_flight.get(name, 0) <= 0]
