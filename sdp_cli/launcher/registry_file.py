"""The registry file `servers.json`: which servers run, where, in what state.

Rewritten atomically (`common.write_text_atomically`) on every change, so a reader (`sdp train
server.registry=PATH`, a dashboard) never sees a half-written file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import httpx

from sdp_cli.common.atomic import write_text_atomically
from sdp_cli.errors import SdpError


class RegistryError(SdpError):
    """A registry file is missing, malformed, or lists no healthy server."""


@dataclass(frozen=True)
class RegistryEntry:
    address: str
    pid: int
    pgid: int
    model: str
    version: int
    state: str
    restarts: int
    started_at: float
    # Ray backend only: the node the server runs on, and the node-local directory it last
    # loaded weights from (weights.transport=ray).
    node: str | None = None
    weights_dir: str | None = None


_KEYS = tuple(f.name for f in fields(RegistryEntry))
_OPTIONAL_KEYS = ("node", "weights_dir")


def _entry_json(entry: RegistryEntry) -> dict[str, object]:
    """The entry's fields; the Ray-only ones only when set, so a local fleet's file is as before."""
    data = asdict(entry)
    for key in _OPTIONAL_KEYS:
        if data[key] is None:
            del data[key]
    return data


def write_registry(path: Path, entries: list[RegistryEntry]) -> None:
    text = json.dumps({"servers": [_entry_json(e) for e in entries]}, indent=2)
    write_text_atomically(Path(path), text + "\n")


def read_registry(path: Path) -> list[RegistryEntry]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(
            f"registry file '{path}' not found\n"
            "  fix: start servers with `sdp launch-servers` and pass the servers.json it writes"
        ) from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"registry file '{path}' is not valid JSON: {exc}") from None
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, list):
        raise RegistryError(f"registry file '{path}' has no \"servers\" list")
    try:
        return [
            RegistryEntry(**{k: item[k] for k in _KEYS if k in item or k not in _OPTIONAL_KEYS})
            for item in servers
        ]
    except (KeyError, TypeError) as exc:
        raise RegistryError(f"registry file '{path}' has a malformed entry: {exc!r}") from None


def healthy(address: str, timeout_s: float, transport: httpx.BaseTransport | None = None) -> bool:
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            return client.get(f"{address}/health").status_code == 200
    except httpx.HTTPError:
        return False


def attach_servers(
    path: Path, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None
) -> list[str]:
    """Addresses of the servers a registry lists that are not dead and answer /health now.
    Raises RegistryError when there is none."""
    entries = read_registry(path)
    live = [e for e in entries if e.state != "dead"]
    addresses = [e.address for e in live if healthy(e.address, timeout_s, transport)]
    if not addresses:
        states = ", ".join(f"{e.address} {e.state}" for e in entries) or "no servers"
        raise RegistryError(
            f"no healthy server in registry '{path}' ({states})\n"
            "  fix: check that `sdp launch-servers` is still running"
        )
    return addresses
