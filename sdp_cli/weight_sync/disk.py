"""The disk transport: the trainer writes `weights_dir/v{N}/` and every vLLM server reloads
it (pause with abort → reload_weights → update_weight_version → resume, `vllm_http`; with
`keep_requests`, train.update_mode=keep, the pause is with keep and nothing is aborted). With
Ray the servers cannot read the exported directory, and the pool's stager
(`launcher.ray_fleet.RayWeightsStager`) copies it to each server's node before the reload.

A server that starts or restarts during a run is given the pool's target weights the same way
(`load_target_weights`), so a weight update never misses one.

With LoRA (the exported directory holds an adapter) each server keeps the base model and loads
the version's adapter under a new name instead of reloading its weights
(`vllm_http.update_server_adapter`); requests then name that adapter (`inference/adapters.py`),
and after the resume the server unloads the adapters no request names any more. In keep mode
the requests in flight are frozen and resumed, not aborted, and finish on the adapter they
named, so their tokens keep its version. A restarted server is the base model plus the target's
adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import httpx

from sdp_cli.inference.adapters import adapter_name
from sdp_cli.inference.client import InferenceClient
from sdp_cli.inference.client_errors import NoServerAvailableError, WeightUpdateError
from sdp_cli.inference.pool import ServerPool, ServerState, ServerStatus
from sdp_cli.weight_sync.versions import is_adapter_dir
from sdp_cli.weight_sync.vllm_http import (
    PHASES,
    PhaseTimings,
    check_adapter_dir,
    check_weights_dir,
    pause_server,
    resume_server,
    set_server_version,
    unload_adapter,
    update_server_adapter,
    update_server_weights,
)

log = logging.getLogger(__name__)


class DiskTransport:
    """The vLLM servers behind an inference client, loading exported directories
    (a `transport.WeightTransport`)."""

    def __init__(self, client: InferenceClient, keep_requests: bool = False) -> None:
        """`keep_requests` (train.update_mode=keep): a reload pauses the servers with keep, so
        requests in flight finish in place under the new weights instead of returning."""
        self._client = client
        self._keep_requests = keep_requests

    async def load_weights(self, weights: Path | str | None, version: int) -> dict[str, float]:
        """Load `weights_dir` as `version` on every ready server at once (pause with abort or
        keep → reload_weights → update_weight_version → resume, each within update_timeout_s).
        The pool records the target first, so a server that is restarting, or that fails here
        and is handed to the supervisor for a restart, is given these weights before it serves
        again. Returns the slowest server's seconds per phase, the total, and server counts."""
        if weights is None:
            raise ValueError("vLLM servers load weights from a directory; the export gave none")
        path = str(checked_weights_dir(weights))
        self._client.pool.set_target_weights(path, version)
        targets = [s for s in self._client.pool.snapshot() if s.state == ServerState.ready]
        if not targets and self._client.pool.all_dead():
            raise NoServerAvailableError(
                "no server to update: every server was given up:\n"
                + self._client.pool.why_all_dead()
            )
        start = time.perf_counter()
        results = await asyncio.gather(
            *(self._update_one(server, path, version) for server in targets)
        )
        timings = {f"{phase}_s": 0.0 for phase in PHASES}
        for result in results:
            if result is not None:
                for key, value in result.as_dict().items():
                    timings[key] = max(timings[key], value)
        failed = sum(result is None for result in results)
        # Under a supervisor a server that failed (one just killed, say) is restarted with
        # these weights before it serves again, so the run can go on; attached servers have no
        # one to bring them back.
        if targets and failed == len(targets) and not self._client.pool.supervised:
            raise WeightUpdateError(
                f"loading '{path}' as version {version} failed on all {failed} servers"
            )
        timings["total_s"] = time.perf_counter() - start
        timings["servers"] = float(len(targets) - failed)
        timings["failed"] = float(failed)
        return timings

    async def abort_generation(self) -> None:
        """Every generation request in flight on a ready server returns now with
        finish_reason "abort" and its tokens so far, and the servers go on serving: pause with
        abort, then resume at once (a paused vLLM server would queue scoring requests too)."""
        http = self._client.http()
        targets = [s for s in self._client.pool.snapshot() if s.state == ServerState.ready]
        await asyncio.gather(*(self._abort_one(http, server) for server in targets))

    async def _abort_one(self, http: httpx.AsyncClient, server: ServerStatus) -> None:
        try:
            await pause_server(
                http, server.address, self._client.update_timeout_s, clear_cache=False
            )
        except (httpx.HTTPError, OSError) as exc:
            # A server that just died (SIGKILL, crash) cannot be paused, nor does it generate:
            # its requests fail and are retried elsewhere, and its supervisor restarts it. The
            # weight update goes on; steer requests away until the health check catches up.
            log.warning("aborting generation on %s failed: %r", server.address, exc)
            self._client.pool.report_unreachable(server.index)
        finally:
            # Resume even after a failed pause, in case the pause went through.
            with contextlib.suppress(httpx.HTTPError, OSError):
                await resume_server(http, server.address, self._client.update_timeout_s)

    async def _update_one(
        self, server: ServerStatus, path: str, version: int
    ) -> PhaseTimings | None:
        http = self._client.http()
        try:
            timings = await sync_server(
                self._client.pool,
                http,
                server.index,
                path,
                version,
                self._client.update_timeout_s,
                keep_requests=self._keep_requests,
            )
        except (httpx.HTTPError, OSError) as exc:
            # Unpause it in case it can still serve, then let the supervisor restart it: its
            # weights are unknown now.
            with contextlib.suppress(httpx.HTTPError, OSError):
                await http.post(f"{server.address}/resume", timeout=5.0)
            self._client.pool.request_restart(server.index, f"weight update failed: {exc!r}")
            return None
        self._client.pool.set_version(server.index, version)
        await unload_unused_adapters(
            self._client.pool, http, server.index, self._client.update_timeout_s
        )
        return timings


async def load_target_weights(
    pool: ServerPool, http: httpx.AsyncClient, index: int, timeout_s: float
) -> None:
    """Give server `index` the pool's target weights and version, then mark it ready; again if
    the target moved on meanwhile (a weight update ran while this server was starting)."""
    address = pool.status(index).address
    while True:
        target = pool.target()
        if target.weights_dir is None:
            await set_server_version(http, address, target.version, timeout_s)
            pool.set_adapter(index, None)
        else:
            await sync_server(pool, http, index, target.weights_dir, target.version, timeout_s)
        if pool.mark_ready_if_current(index, target.version):
            await unload_unused_adapters(pool, http, index, timeout_s)
            return


def checked_weights_dir(weights: Path | str) -> Path:
    """The exported directory, checked for what vLLM needs: a whole model, or an adapter."""
    if is_adapter_dir(weights):
        return check_adapter_dir(weights)
    return check_weights_dir(weights)


async def sync_server(
    pool: ServerPool,
    http: httpx.AsyncClient,
    index: int,
    weights_dir: str,
    version: int,
    timeout_s: float,
    keep_requests: bool = False,
) -> PhaseTimings:
    """Load `weights_dir` as `version` on server `index` (the whole protocol): reload the
    weights, or load the adapter under the version's name and route its requests to it.
    `keep_requests` (train.update_mode=keep): pause with keep, so requests in flight go on (with
    LoRA, on the adapter they named)."""
    address = pool.status(index).address
    path = await pool.weights_path_for(index, weights_dir, version)
    if not is_adapter_dir(weights_dir):
        timings = await update_server_weights(
            http, address, path, version, timeout_s, keep_requests=keep_requests
        )
        # Whole weights: requests name the served model again, no adapter.
        pool.set_adapter(index, None)
        return timings
    adapter = adapter_name(pool.adapter_prefix, version)
    timings = await update_server_adapter(
        http, address, path, adapter, version, timeout_s, keep_requests=keep_requests
    )
    pool.set_adapter(index, adapter)
    return timings


async def unload_unused_adapters(
    pool: ServerPool, http: httpx.AsyncClient, index: int, timeout_s: float
) -> None:
    """Unload the adapters server `index` loaded before and no request in flight names (the
    others wait for a later update). Best effort: a server that fails it still serves."""
    address = pool.status(index).address
    for adapter in pool.unloadable_adapters(index):
        try:
            await unload_adapter(http, address, adapter, timeout_s)
        except (httpx.HTTPError, OSError) as exc:
            log.warning("unloading adapter %s on %s failed: %r", adapter, address, exc)
            continue
        pool.forget_adapter(index, adapter)
