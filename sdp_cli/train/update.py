"""The weight-update protocol: one sequence for `sdp train` and `sdp simulate`.

`sdp train` plugs in the actor's weight export and the vLLM servers; `sdp simulate` a simulated
export and simulated servers. The sequence (docs/design.md, Weight-update protocol):

1. pause the executor: no new segment starts.
2. prox_mode=segment: score the buffered samples under v (the servers still hold it) while the
   new weights are exported and while requests already on the servers keep generating under v.
3. prox_mode=segment: the servers abort what they are generating and keep serving; the executor
   waits until no running rollout can finish before it resumes (each waits at the closed gate
   or has ended); a second pass then scores what finished since the first. After this point no
   sample can enter the buffer under v, so the recompute covers every buffered sample. (A vLLM
   server paused with /pause would queue the scoring requests, hence abort-and-resume here.)
4. the servers load v+1: pause with abort, reload, set the version, resume.
5. the executor moves to v+1, which purges what became too stale, and resumes.

It runs as a coroutine on the executor's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from sdp_cli.common.faults import hold_point
from sdp_cli.config.schema import ProxMode
from sdp_cli.rollout.executor import RolloutExecutor
from sdp_cli.rollout.recompute import RecomputeStats, needs_proximal_recompute
from sdp_cli.telemetry.events import EventSink
from sdp_cli.telemetry.schema import ProximalRecomputeEvent, WeightUpdateEvent

if TYPE_CHECKING:
    from sdp_cli.inference.client import InferenceClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# Write the weights of `version` where the servers can load them; returns their directory
# (None for simulated weights).
ExportWeights = Callable[[int], Awaitable[Path | None]]


class UpdateServers(Protocol):
    async def abort_generation(self) -> None:
        """Make every generation request in flight return now with its tokens so far, and
        leave the servers serving (scoring requests must not queue behind a pause)."""
        ...

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        """Load `weights` as `version` on every server; returns seconds per phase."""
        ...


class InferenceServers:
    """The vLLM servers behind an inference client, as the weight update sees them."""

    def __init__(self, client: InferenceClient) -> None:
        self._client = client

    async def abort_generation(self) -> None:
        await self._client.abort_generation()

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        if weights is None:
            raise ValueError("vLLM servers load weights from a directory; the export gave none")
        return await self._client.update_weights(weights, version)


@dataclass
class UpdateResult:
    version: int
    weights_dir: Path | None
    # Seconds of each step of the sequence, and of the servers' own phases.
    phases: dict[str, float] = field(default_factory=dict)
    server_phases: dict[str, float] = field(default_factory=dict)
    recompute: RecomputeStats | None = None
    # False if some rollout still generated under v when the settle deadline passed.
    settled: bool = True
    total_s: float = 0.0


class WeightUpdate:
    def __init__(
        self,
        executor: RolloutExecutor,
        servers: UpdateServers,
        export: ExportWeights,
        prox_mode: ProxMode,
        events: EventSink,
        *,
        settle_timeout_s: float = 60.0,
        abort_every_s: float = 1.0,
    ) -> None:
        """`settle_timeout_s` bounds step 3; the servers are asked to abort again every
        `abort_every_s` meanwhile (a request in transit during one abort arrives after it)."""
        self._executor = executor
        self._servers = servers
        self._export = export
        self._recompute = needs_proximal_recompute(prox_mode)
        self._events = events
        self._settle_timeout_s = settle_timeout_s
        self._abort_every_s = abort_every_s

    async def run(self, version: int) -> UpdateResult:
        """Move the servers and the executor from `version` to `version + 1`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        new_version = version + 1
        result = UpdateResult(version=new_version, weights_dir=None)

        async def timed(name: str, step: Awaitable[T]) -> T:
            t0 = loop.time()
            try:
                return await step
            finally:
                result.phases[name] = result.phases.get(name, 0.0) + loop.time() - t0

        executor = self._executor
        await timed("pause_s", executor.pause_async())
        first_pass = (
            asyncio.ensure_future(executor.recompute_async(version)) if self._recompute else None
        )
        try:
            result.weights_dir = await timed("export_s", self._export(new_version))
            if first_pass is not None:
                early = await timed("recompute_s", first_pass)
                result.settled = await timed("abort_s", self._stop_generation())
                late = await timed("recompute_s", executor.recompute_async(version))
                result.recompute = early.merged(late)
                self._emit_recompute(result.recompute, late, result.settled)
        finally:
            if first_pass is not None and not first_pass.done():
                first_pass.cancel()
        hold_point("weight_update")
        result.server_phases = await timed(
            "reload_s", self._servers.load_weights(result.weights_dir, new_version)
        )
        await timed("set_version_s", executor.set_version_async(new_version))
        await timed("resume_s", executor.resume_async())
        result.total_s = loop.time() - started
        self._emit_update(result)
        return result

    async def _stop_generation(self) -> bool:
        """Abort until no running rollout can finish under the current weights."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settle_timeout_s
        while True:
            await self._servers.abort_generation()
            left = deadline - loop.time()
            if await self._executor.settle_async(min(self._abort_every_s, max(left, 0.0))):
                return True
            if loop.time() >= deadline:
                log.warning(
                    "rollouts kept generating %.0f s after the servers aborted them; samples "
                    "they finish may miss the proximal recompute",
                    self._settle_timeout_s,
                )
                return False

    def _emit_recompute(self, stats: RecomputeStats, late: RecomputeStats, settled: bool) -> None:
        self._events.emit(
            ProximalRecomputeEvent(
                **stats.as_dict(),
                # Of `samples`, those that finished while the update was under way.
                late_samples=late.samples,
                settled=settled,
            )
        )

    def _emit_update(self, result: UpdateResult) -> None:
        self._events.emit(
            WeightUpdateEvent(
                version=result.version,
                phases=result.phases,
                server_phases=result.server_phases,
                weights_dir=None if result.weights_dir is None else str(result.weights_dir),
                total_s=result.total_s,
            )
        )
