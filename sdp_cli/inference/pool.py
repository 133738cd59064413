"""Shared state of the inference servers: addresses, states, versions and in-flight counts.

The launcher's supervisor writes states and versions; the client routes over the pool and counts
its in-flight requests. Both may run on different threads, so every access takes one lock, and
listeners (the registry writer, the event log) are called outside it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sdp_cli.inference.adapters import adapter_prefix, adapters_to_unload


class ServerState(StrEnum):
    starting = "starting"
    ready = "ready"
    restarting = "restarting"
    dead = "dead"


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one server's entry in the pool."""

    index: int
    address: str
    state: ServerState
    version: int
    in_flight: int = 0
    restarts: int = 0
    # Times the server died (its process exited or it hung) while routed to; the client tells
    # by this count whether a server died while serving one of its requests.
    crashes: int = 0
    # Why the supervisor gave the server up (state dead), with its log's last error.
    dead_because: str | None = None
    # With LoRA: the adapter of the server's version, which its requests name as "model".
    adapter: str | None = None


@dataclass(frozen=True)
class WeightsTarget:
    """The weights every ready server must hold: what a restarted server is loaded with."""

    version: int
    weights_dir: str | None = None


Listener = Callable[[ServerStatus], None]
# (server index, exported weights directory, version) -> the directory that server loads from;
# the launcher installs one when the servers cannot read the exported directory itself.
WeightsStager = Callable[[int, str, int], Awaitable[str]]

# How long the client steers other requests away from a server that refused a connection,
# giving the supervisor's health check time to take it out of routing.
SUSPECT_S = 2.0


@dataclass
class _Entry:
    status: ServerStatus
    restart_reason: str | None = None
    suspect_until: float = 0.0
    # With LoRA: every adapter loaded on the server and not unloaded yet, and how many
    # requests in flight named each.
    loaded_adapters: list[str] = field(default_factory=list)
    adapter_requests: Counter[str] = field(default_factory=Counter)


class ServerPool:
    def __init__(
        self,
        addresses: Sequence[str] = (),
        state: ServerState = ServerState.ready,
        version: int = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._listeners: list[Listener] = []
        self._target = WeightsTarget(version=version)
        # True when a supervisor (launcher.ServerFleet) restarts the servers a restart is
        # requested for, and loads the target weights into them before they serve again.
        self.supervised = False
        self._stager: WeightsStager | None = None
        # The names of this pool's LoRA adapters start with it (inference/adapters.py).
        self.adapter_prefix = adapter_prefix()
        for address in addresses:
            self.add(address, state=state, version=version)

    # ---- membership and listeners -------------------------------------------------------

    def add(self, address: str, state: ServerState = ServerState.starting, version: int = 0) -> int:
        """Register a server; returns its index (stable for the pool's lifetime)."""
        with self._lock:
            index = len(self._entries)
            status = ServerStatus(index=index, address=address, state=state, version=version)
            self._entries.append(_Entry(status=status))
        self._notify(status)
        return index

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with the new status whenever a server's address, state, version or
        restart count changes (not on in-flight changes, which happen on every request)."""
        with self._lock:
            self._listeners.append(listener)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # ---- reading ------------------------------------------------------------------------

    def status(self, index: int) -> ServerStatus:
        with self._lock:
            return self._entries[index].status

    def snapshot(self) -> list[ServerStatus]:
        with self._lock:
            return [entry.status for entry in self._entries]

    @property
    def addresses(self) -> list[str]:
        return [status.address for status in self.snapshot()]

    def ready_addresses(self) -> list[str]:
        return [s.address for s in self.snapshot() if s.state == ServerState.ready]

    def all_dead(self) -> bool:
        with self._lock:
            return all(e.status.state == ServerState.dead for e in self._entries)

    # ---- supervisor side ----------------------------------------------------------------

    def set_state(self, index: int, state: ServerState, because: str | None = None) -> None:
        """`because` says why a server is given up (state dead)."""
        if state == ServerState.dead and because is not None:
            self._update(index, state=state, dead_because=because)
        else:
            self._update(index, state=state)
        if state != ServerState.ready:
            return
        with self._lock:
            self._entries[index].suspect_until = 0.0

    def set_version(self, index: int, version: int) -> None:
        self._update(index, version=version)

    def set_address(self, index: int, address: str) -> None:
        self._update(index, address=address)

    def count_restart(self, index: int) -> int:
        return self._count(index, "restarts")

    def count_crash(self, index: int) -> int:
        return self._count(index, "crashes")

    def why_all_dead(self) -> str:
        """One line per server on why it was given up (for the error that ends a run)."""
        lines = []
        for status in self.snapshot():
            cause = status.dead_because or "stopped"
            lines.append(f"  server {status.index} ({status.address}): {cause}")
        return "\n".join(lines)

    def request_restart(self, index: int, reason: str) -> None:
        """Take a server out of routing and ask the supervisor to restart and resync it (used
        when it failed the weight-update protocol)."""
        with self._lock:
            entry = self._entries[index]
            # A server already (re)starting loads the target weights before it serves (the
            # target is set before any update is sent), so a failure seen meanwhile (the
            # server was just killed, say) must not cost a second restart.
            if entry.status.state in (ServerState.dead, ServerState.starting):
                return
            if entry.status.state == ServerState.restarting and entry.restart_reason is None:
                return
            entry.restart_reason = reason
        self._update(index, state=ServerState.restarting)

    def take_restart_request(self, index: int) -> str | None:
        """The reason a restart was requested, once; None if none is pending."""
        with self._lock:
            entry = self._entries[index]
            reason, entry.restart_reason = entry.restart_reason, None
            return reason

    def set_target_weights(self, weights_dir: str | None, version: int) -> None:
        with self._lock:
            self._target = WeightsTarget(version=version, weights_dir=weights_dir)

    def target(self) -> WeightsTarget:
        with self._lock:
            return self._target

    def set_weights_stager(self, stager: WeightsStager | None) -> None:
        """Have every weight load first copy the exported directory to where the server can
        read it (its node's local disk, with Ray); None reads the exported directory itself."""
        self._stager = stager

    async def weights_path_for(self, index: int, weights_dir: str, version: int) -> str:
        """The directory server `index` should load `version` from."""
        stager = self._stager
        if stager is None:
            return weights_dir
        return await stager(index, weights_dir, version)

    def mark_ready_if_current(self, index: int, version: int) -> bool:
        """Mark a freshly synced server ready, unless the target moved on while it was being
        synced (then the caller syncs again). Returns whether it was marked ready."""
        with self._lock:
            if self._target.version != version:
                return False
        self._update(index, state=ServerState.ready, version=version)
        return True

    # ---- client side --------------------------------------------------------------------

    def acquire(self, avoid: Collection[int] = ()) -> ServerStatus | None:
        """Pick the routable server with the fewest in-flight requests and count one more
        request on it; None if no server is routable now. Servers in `avoid` (they just
        failed this request) and suspects are used only when nothing else is routable."""
        now = time.monotonic()
        with self._lock:
            routable = [
                e
                for e in self._entries
                if e.status.state == ServerState.ready and e.restart_reason is None
            ]
            if not routable:
                return None
            preferred = [
                e for e in routable if e.status.index not in avoid and e.suspect_until <= now
            ]
            chosen = min(preferred or routable, key=lambda e: e.status.in_flight)
            chosen.status = replace(chosen.status, in_flight=chosen.status.in_flight + 1)
            if chosen.status.adapter is not None:
                chosen.adapter_requests[chosen.status.adapter] += 1
            return chosen.status

    def release(self, index: int, adapter: str | None = None) -> None:
        """A request acquired on server `index` is over; `adapter` is the one it named."""
        with self._lock:
            entry = self._entries[index]
            entry.status = replace(entry.status, in_flight=max(0, entry.status.in_flight - 1))
            if adapter is not None and entry.adapter_requests[adapter] > 0:
                entry.adapter_requests[adapter] -= 1

    # ---- LoRA adapters ------------------------------------------------------------------

    def set_adapter(self, index: int, adapter: str | None) -> None:
        """Server `index` serves its version under `adapter` now (None: its own weights)."""
        with self._lock:
            entry = self._entries[index]
            if adapter is not None and adapter not in entry.loaded_adapters:
                entry.loaded_adapters.append(adapter)
        self._update(index, adapter=adapter)

    def unloadable_adapters(self, index: int) -> list[str]:
        """The adapters server `index` may unload now (`adapters_to_unload`)."""
        with self._lock:
            entry = self._entries[index]
            return adapters_to_unload(
                entry.loaded_adapters, entry.status.adapter, entry.adapter_requests
            )

    def forget_adapter(self, index: int, adapter: str) -> None:
        """Server `index` holds `adapter` no more (unloaded, or the server restarted)."""
        with self._lock:
            loaded = self._entries[index].loaded_adapters
            if adapter in loaded:
                loaded.remove(adapter)

    def report_unreachable(self, index: int) -> None:
        """A connection to this server failed: prefer the others for a moment."""
        with self._lock:
            self._entries[index].suspect_until = time.monotonic() + SUSPECT_S

    # ---- internals ----------------------------------------------------------------------

    def _count(self, index: int, counter: str) -> int:
        """Add one to a counter of the server's status (only the supervisor counts)."""
        with self._lock:
            value = int(getattr(self._entries[index].status, counter)) + 1
        self._update(index, **{counter: value})
        return value

    def _update(self, index: int, **changes: object) -> None:
        with self._lock:
            entry = self._entries[index]
            new = replace(entry.status, **changes)  # type: ignore[arg-type]
            changed = new != entry.status
            entry.status = new
        if changed:
            self._notify(new)

    def _notify(self, status: ServerStatus) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(status)
