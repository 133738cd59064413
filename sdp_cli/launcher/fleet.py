"""A supervised fleet of vLLM servers.

`ServerFleet.start()` spawns `server.count` servers at once (each in its own process group,
logging to `<run.dir>/logs/server-<i>.log`), waits until every one answers /health and a one-token
warm-up request, names its weights version 0, and marks it ready in the shared `ServerPool`.
A supervisor (an asyncio loop on its own thread, one watch task per server) then restarts a server
whose process exits, that stops answering /health, or that the client handed over after it failed
a weight update: bounded by `server.max_restarts`, with exponential backoff, and loading the
current weights and version before the server is routed to again. Every change rewrites the
registry file and emits a `server_state` event. `stop()` (also run at interpreter exit) terminates
every process group and kills what is left after `server.shutdown_grace_s`. The fleet installs no
signal handler: the command that owns it turns signals into exceptions (commands/signals.py), so
`stop()` runs on the way out.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

from sdp_cli.common.loop_thread import LoopThread
from sdp_cli.config.server_settings import Device, ServerConfig
from sdp_cli.events.event_log import EventSink, NullEventLog
from sdp_cli.events.event_schema import ServerStateEvent
from sdp_cli.inference.pool import ServerPool, ServerState, ServerStatus
from sdp_cli.inference.protocol import GENERATE_PATH, generate_body, parse_version
from sdp_cli.launcher.command import check_vllm_installed, server_device
from sdp_cli.launcher.devices import split_devices, visible_cuda_devices
from sdp_cli.launcher.process import (
    LocalProcessBackend,
    ProcessBackend,
    ServerProcess,
    free_port,
    group_alive,
)
from sdp_cli.launcher.registry_file import RegistryEntry, write_registry
from sdp_cli.launcher.server import (
    PortTakenError,
    ServerStartError,
    last_error,
    launch_spec,
    log_size,
    server_address,
    startup_failure,
)
from sdp_cli.weight_sync.disk import load_target_weights
from sdp_cli.weight_sync.vllm_http import server_version

T = TypeVar("T")

# Attempts to spawn a server on a fresh port when the one picked was taken before it bound.
PORT_ATTEMPTS = 3
WARMUP_TOKEN_IDS = [1, 4, 5]


class ServerFleet:
    def __init__(
        self,
        server: ServerConfig,
        model_dir: Path,
        run_dir: Path,
        *,
        registry_path: Path | None = None,
        backend: ProcessBackend | None = None,
        events: EventSink | None = None,
        pool: ServerPool | None = None,
        observe_servers: bool = False,
        restart_backoff_s: float = 1.0,
        hang_after_s: float = 30.0,
    ) -> None:
        """`observe_servers` makes the supervisor read each server's version (/weight_info)
        and load (/metrics) on every health check; for `sdp launch-servers`, where another
        process updates the weights. In-process, the client keeps the pool's versions."""
        self.server = server
        self.model_dir = Path(model_dir).resolve()
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.registry_path = Path(registry_path) if registry_path else self.run_dir / "servers.json"
        self.backend: ProcessBackend = backend or LocalProcessBackend()
        self.events: EventSink = events or NullEventLog()
        self.pool = pool if pool is not None else ServerPool()
        if len(self.pool):
            raise ValueError("ServerFleet needs an empty ServerPool; it adds its own servers")
        self.pool.supervised = True
        self.observe_servers = observe_servers
        self.restart_backoff_s = restart_backoff_s
        self.hang_after_s = hang_after_s
        # Requests running or waiting on each server, from its /metrics (observe_servers only).
        self.loads: dict[int, int] = {}
        self._procs: dict[int, ServerProcess] = {}
        self._started_at: dict[int, float] = {}
        # Where each server's current process began writing its log (a restart appends).
        self._log_start: dict[int, int] = {}
        self._devices: list[list[str] | None] = []
        self._last_healthy: dict[int, float] = {}
        self._registry_lock = threading.Lock()
        self._supervisor = LoopThread("sdp-server-supervisor")
        self._http: httpx.AsyncClient | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._watchers: list[asyncio.Task[None]] = []
        self._stopped = False

    # ---- public API ---------------------------------------------------------------------

    def start(self) -> ServerPool:
        """Start every server and the supervisor; returns the pool once all are ready. On any
        failure (or Ctrl-C) everything started is stopped before the error propagates."""
        check_vllm_installed()
        if not (self.model_dir / "config.json").is_file():
            raise ServerStartError(
                f"model directory '{self.model_dir}' is missing or incomplete (no config.json)\n"
                "  fix: pass a local Hugging Face model directory, or model.path=builtin:tiny"
            )
        self._devices = self._device_groups()
        self.pool.subscribe(self._on_pool_change)
        self._supervisor.start()
        atexit.register(self.stop)
        try:
            self._call(self._start_all())
            self._call(self._start_watchers())
        except BaseException:
            self.stop()
            raise
        return self.pool

    def set_current_weights(self, weights_dir: str | Path, version: int) -> None:
        """Tell the supervisor which weights a (re)started server must load before it serves.
        `DiskTransport.load_weights` records this itself; call it directly when the servers
        were given weights some other way (e.g. resuming from a checkpoint)."""
        self.pool.set_target_weights(str(Path(weights_dir).resolve()), version)

    @property
    def addresses(self) -> list[str]:
        return self.pool.addresses

    def process(self, index: int) -> ServerProcess:
        """The current process of server `index` (a new one after each restart)."""
        return self._procs[index]

    def pid(self, index: int) -> int | None:
        proc = self._procs.get(index)
        return proc.pid if proc else None

    def node_of(self, index: int) -> str | None:
        """The cluster node server `index` runs on; None for local processes."""
        return None

    def stop(self) -> None:
        """Stop the supervisor and every server process group; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self._supervisor.running():
                for future in list(self._pending):
                    future.cancel()
                grace = self.server.shutdown_grace_s
                self._supervisor.call(self._shutdown(), timeout=grace + 30.0)
        finally:
            self._kill_leftovers()
            self._supervisor.stop()
            self._write_registry()

    def __enter__(self) -> ServerFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the supervisor's event loop ----------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the supervisor loop and wait for it from this thread; `stop()`
        cancels it."""
        future = self._supervisor.submit(coro)
        self._pending.add(future)
        try:
            return future.result()
        finally:
            self._pending.discard(future)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        return self._http

    # ---- starting -----------------------------------------------------------------------

    def _device_groups(self) -> list[list[str] | None]:
        count = self.server.count
        if server_device(self.server) != Device.cuda:
            return [None] * count
        devices = visible_cuda_devices()
        if self.server.gpu_ids:
            # `sdp train` checked that they are visible (commands/preflight.py).
            devices = [devices[i] for i in self.server.gpu_ids if i < len(devices)]
        return list(split_devices(count, self.server.tensor_parallel_size, devices))

    async def _start_all(self) -> None:
        taken: set[int] = set()
        for index in range(self.server.count):
            port = self._pick_port(index, taken)
            taken.add(port)
            self.pool.add(server_address(self.server.host, port), state=ServerState.starting)
        # All at once: each takes tens of seconds to load, most of it waiting on imports.
        await asyncio.gather(*(self._bring_up(i) for i in range(self.server.count)))

    def _pick_port(self, index: int, taken: set[int], preferred: int = 0) -> int:
        start = preferred or (self.server.base_port + index if self.server.base_port else 0)
        return free_port(self.server.host, start, taken)

    def _ports_in_use(self, index: int) -> set[int]:
        return {int(s.address.rsplit(":", 1)[1]) for s in self.pool.snapshot() if s.index != index}

    async def _bring_up(self, index: int) -> None:
        """Spawn server `index` on its pool address (or a fresh port if that one is taken),
        wait until it serves, load the current weights, and mark it ready."""
        for attempt in range(PORT_ATTEMPTS):
            current = int(self.pool.status(index).address.rsplit(":", 1)[1])
            port = self._pick_port(index, self._ports_in_use(index), preferred=current)
            self.pool.set_address(index, server_address(self.server.host, port))
            proc, log_start = self._spawn(index, port)
            try:
                await self._wait_until_serving(index, proc, log_start)
                # Its shared memory exists now; if it crashes, only this record names it.
                proc.remember_shared_memory()
                break
            except PortTakenError:
                await asyncio.to_thread(self.backend.stop, proc, 1.0)
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        await self._load_current_weights(index)

    def _spawn(self, index: int, port: int) -> tuple[ServerProcess, int]:
        spec = launch_spec(
            self.server,
            self.model_dir,
            index,
            self.log_dir,
            port=port,
            cuda_devices=self._devices[index],
        )
        log_start = log_size(spec.log_path)
        proc = self.backend.start(spec)
        self._procs[index] = proc
        self._started_at[index] = time.time()
        self._log_start[index] = log_start
        self._write_registry()
        return proc, log_start

    async def _wait_until_serving(self, index: int, proc: ServerProcess, log_start: int) -> None:
        """Until /health answers and a one-token request succeeds (some model shapes fail only
        at the first forward pass); raises ServerStartError with the log's tail."""
        address = self.pool.status(index).address
        deadline = time.monotonic() + self.server.ready_timeout_s
        http = self._client()
        while True:
            if proc.poll() is not None:
                raise self._failure(index, proc, log_start, "exited")
            if time.monotonic() > deadline:
                what = f"was not healthy after {self.server.ready_timeout_s:.0f} s"
                raise self._failure(index, proc, log_start, what)
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{address}/health", timeout=2.0)).status_code == 200:
                    break
            await asyncio.sleep(0.5)
        body = generate_body(
            f"sdp-warmup-{index}-{time.time_ns()}",
            WARMUP_TOKEN_IDS,
            {"max_tokens": 1, "temperature": 1.0, "logprobs": 0, "detokenize": False},
        )
        try:
            response = await http.post(f"{address}{GENERATE_PATH}", json=body, timeout=60.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            # Give the engine a moment to log why it failed before the log is read.
            await asyncio.sleep(1.0)
            raise self._failure(
                index, proc, log_start, f"failed its first request ({exc})"
            ) from None
        self._last_healthy[index] = time.monotonic()

    def _failure(
        self, index: int, proc: ServerProcess, log_start: int, what: str
    ) -> ServerStartError:
        address = self.pool.status(index).address
        return startup_failure(index, address, proc.spec.log_path, log_start, what)

    async def _load_current_weights(self, index: int) -> None:
        await load_target_weights(self.pool, self._client(), index, self.server.request_timeout_s)
        self._last_healthy[index] = time.monotonic()

    # ---- supervision --------------------------------------------------------------------

    async def _start_watchers(self) -> None:
        self._watchers = [
            asyncio.create_task(self._watch(i), name=f"watch-server-{i}")
            for i in range(len(self.pool))
        ]

    async def _watch(self, index: int) -> None:
        while self.pool.status(index).state != ServerState.dead:
            await asyncio.sleep(self.server.health_interval_s)
            reason = self.pool.take_restart_request(index)
            if reason is None:
                reason = await self._problem(index)
                if reason is not None:
                    # It died (exited or hung) while routed to: out of routing first, so that a
                    # request routed to it again sees this death counted (inference/poison.py).
                    self.pool.set_state(index, ServerState.restarting)
                    self.pool.count_crash(index)
                    reason = self._with_last_error(index, reason)
            if reason is not None:
                await self._restart(index, reason)

    def _with_last_error(self, index: int, reason: str) -> str:
        proc = self._procs[index]
        error = last_error(proc.spec.log_path, self._log_start.get(index, 0))
        if error is None:
            return reason
        return f"{reason}; last error in {proc.spec.log_path}: {error}"

    async def _problem(self, index: int) -> str | None:
        """Why server `index` needs a restart, or None while it is fine."""
        code = self._procs[index].poll()
        if code is not None:
            return f"process exited with code {code}"
        status = self.pool.status(index)
        if await self._answers_health(status):
            self._last_healthy[index] = time.monotonic()
            if self.observe_servers:
                await self._observe(status)
            return None
        silent = time.monotonic() - self._last_healthy.get(index, time.monotonic())
        if silent > self.hang_after_s:
            return f"no answer on /health for {silent:.0f} s"
        return None

    async def _answers_health(self, status: ServerStatus) -> bool:
        timeout = min(10.0, max(1.0, self.hang_after_s / 3))
        try:
            response = await self._client().get(f"{status.address}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _observe(self, status: ServerStatus) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            name = await server_version(self._client(), status.address, 5.0)
            self.pool.set_version(status.index, parse_version(name))
            metrics = await self._client().get(f"{status.address}/metrics", timeout=5.0)
            self.loads[status.index] = requests_on_server(metrics.text)

    async def _restart(self, index: int, reason: str) -> None:
        """Restart until the server serves again or `server.max_restarts` is used up."""
        while True:
            restarts = self.pool.status(index).restarts
            if restarts >= self.server.max_restarts:
                because = f"{reason}; given up after {restarts} restarts (server.max_restarts)"
                self._emit(index, reason=because)
                await asyncio.to_thread(self.backend.stop, self._procs[index], 1.0)
                self.pool.set_state(index, ServerState.dead, because=because)
                return
            self.pool.set_state(index, ServerState.restarting)
            self._emit(index, reason=reason)
            await asyncio.to_thread(
                self.backend.stop, self._procs[index], self.server.shutdown_grace_s
            )
            await asyncio.sleep(self.restart_backoff_s * 2**restarts)
            self.pool.count_restart(index)
            try:
                await self._bring_up(index)
                return
            except (ServerStartError, httpx.HTTPError, OSError) as exc:
                reason = self._with_last_error(index, f"restart failed: {exc}".splitlines()[0])

    # ---- stopping -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        grace = self.server.shutdown_grace_s
        await asyncio.gather(
            *(asyncio.to_thread(self.backend.stop, p, grace) for p in self._procs.values()),
            return_exceptions=True,
        )
        for status in self.pool.snapshot():
            self.pool.set_state(status.index, ServerState.dead)
        if self._http is not None:
            await self._http.aclose()

    def _kill_leftovers(self) -> None:
        """Last resort when the graceful path was interrupted: SIGKILL whatever group lives."""
        for proc in self._procs.values():
            if group_alive(proc.pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pgid, signal.SIGKILL)

    # ---- registry and events ------------------------------------------------------------

    def _on_pool_change(self, status: ServerStatus) -> None:
        self._write_registry()
        if status.state != ServerState.restarting:
            self._emit(status.index)

    def _emit(self, index: int, reason: str | None = None) -> None:
        status = self.pool.status(index)
        proc = self._procs.get(index)
        self.events.emit(
            ServerStateEvent(
                server=index,
                address=status.address,
                state=status.state.value,
                version=status.version,
                restarts=status.restarts,
                pid=proc.pid if proc else None,
                reason=reason or None,
                node=self.node_of(index),
            )
        )

    def registry_entries(self) -> list[RegistryEntry]:
        entries = []
        for status in self.pool.snapshot():
            proc = self._procs.get(status.index)
            entries.append(
                RegistryEntry(
                    address=status.address,
                    pid=proc.pid if proc else 0,
                    pgid=proc.pgid if proc else 0,
                    model=str(self.model_dir),
                    version=status.version,
                    state=status.state.value,
                    restarts=status.restarts,
                    started_at=self._started_at.get(status.index, 0.0),
                )
            )
        return entries

    def _write_registry(self) -> None:
        with self._registry_lock:
            write_registry(self.registry_path, self.registry_entries())


def requests_on_server(metrics_text: str) -> int:
    """Running plus waiting requests from a vLLM /metrics page."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
