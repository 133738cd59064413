"""Simulated inference servers that behave like vLLM where staleness is concerned.

Each server decodes at most `server_batch` requests at once (the rest wait for a slot); a
request's tokens each take a lognormal time with mean `token_latency_s` plus
`token_latency_per_seq_s` for each request decoding at that moment (itself included). A pause
in abort mode works like vLLM's: requests decoding return at once with the tokens produced so
far and `finish_reason="abort"`, requests waiting for a slot return with none, requests that
arrive while paused wait until resume, and everything decoded after a weight update carries the
new version. The client turns an abort into a new segment.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from sdp_cli.config.schema import SimulateConfig
from sdp_cli.simulate.clock import SimTime
from sdp_cli.telemetry.events import EventSink, NullEventLog
from sdp_cli.telemetry.schema import ServerStateEvent

# Stand-in values: the simulation tracks versions and timing, not text.
_TOKEN_LOGPROB = -1.0
_VOCAB = 64


@dataclass
class SimulatedSegment:
    token_ids: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str  # "length" or "abort"


@dataclass(eq=False)
class _Decoding:
    """One request holding a decode slot; a pause with abort resolves `aborted`."""

    aborted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SimulatedServer:
    def __init__(self, index: int, sim: SimulateConfig, rng: random.Random, time: SimTime):
        self.index = index
        self.version = 0
        self._sim = sim
        self._rng = rng
        self._time = time
        self._slots = asyncio.Semaphore(sim.server_batch)
        self._open = asyncio.Event()
        self._open.set()
        # A dict, not a set: aborts must resolve in a reproducible order.
        self._decoding: dict[_Decoding, None] = {}
        # Requests waiting or decoding, for routing.
        self.load = 0
        self.busy_s = 0.0
        self._busy_since: float | None = None
        self._sigma = max(sim.latency_jitter, 0.0)
        self.tokens_out = 0
        self.aborted = 0
        # Counts pauses with abort, so a request waiting for a slot knows it was aborted.
        self._aborts = 0

    async def generate(self, max_tokens: int) -> SimulatedSegment:
        self.load += 1
        aborts_at_arrival = self._aborts
        try:
            async with self._slots:
                while not self._open.is_set():
                    await self._open.wait()
                if self._aborts != aborts_at_arrival:
                    self.aborted += 1
                    return self._segment(0, self.version, "abort")
                return await self._decode(max_tokens)
        finally:
            self.load -= 1

    async def _decode(self, max_tokens: int) -> SimulatedSegment:
        version = self.version
        if self._sim.token_latency_s <= 0 and self._sim.token_latency_per_seq_s <= 0:
            return self._segment(max_tokens, version, "length")
        request = _Decoding()
        self._start_busy(request)
        produced = 0
        try:
            while produced < max_tokens:
                # The requests decoding on a server share its steps: more of them, slower tokens.
                decoding = len(self._decoding)
                mean = self._sim.token_latency_s + self._sim.token_latency_per_seq_s * decoding
                # Lognormal with that mean: E[exp(N(mu, σ²))] = exp(mu + σ²/2).
                latency = self._rng.lognormvariate(math.log(mean) - self._sigma**2 / 2, self._sigma)
                # Waiting on the future itself: no task per token, which wait_for would make.
                await asyncio.wait((request.aborted,), timeout=self._time.loop_seconds(latency))
                if request.aborted.done():
                    return self._segment(produced, version, "abort")
                produced += 1
        finally:
            self._end_busy(request)
        return self._segment(produced, version, "length")

    def _segment(self, n_tokens: int, version: int, finish_reason: str) -> SimulatedSegment:
        self.tokens_out += n_tokens
        offset = self.tokens_out
        return SimulatedSegment(
            token_ids=[(offset + i) % _VOCAB for i in range(n_tokens)],
            logprobs=[_TOKEN_LOGPROB] * n_tokens,
            version=version,
            finish_reason=finish_reason,
        )

    def pause_abort(self) -> None:
        """`POST /pause?mode=abort`: in-flight requests return what they have so far."""
        self._open.clear()
        self._aborts += 1
        for request in list(self._decoding):
            if not request.aborted.done():
                request.aborted.set_result(None)
                self.aborted += 1

    def resume(self) -> None:
        self._open.set()

    def _start_busy(self, request: _Decoding) -> None:
        if not self._decoding:
            self._busy_since = self._time.now()
        self._decoding[request] = None

    def _end_busy(self, request: _Decoding) -> None:
        self._decoding.pop(request, None)
        if not self._decoding and self._busy_since is not None:
            self.busy_s += self._time.now() - self._busy_since
            self._busy_since = None

    def busy_seconds(self, now: float) -> float:
        """Simulated seconds with at least one request decoding, up to `now`."""
        running = now - self._busy_since if self._busy_since is not None else 0.0
        return self.busy_s + running


class SimulatedFleet:
    """The simulated servers, routed least-loaded first, updated together."""

    def __init__(
        self,
        count: int,
        sim: SimulateConfig,
        rng: random.Random,
        time: SimTime,
        events: EventSink | None = None,
    ):
        self.servers = [SimulatedServer(i, sim, rng, time) for i in range(count)]
        self._sim = sim
        self._time = time
        self._events: EventSink = events if events is not None else NullEventLog()
        self.version = 0

    def report_states(self) -> None:
        """A `server_state` event per server, as the real fleet writes when one changes."""
        for server in self.servers:
            self._events.emit(
                ServerStateEvent(
                    server=server.index,
                    address=f"sim://{server.index}",
                    state="ready",
                    version=server.version,
                )
            )

    def now(self) -> float:
        """Simulated seconds on the running loop."""
        return self._time.now()

    def _least_loaded(self) -> SimulatedServer:
        return min(self.servers, key=lambda server: server.load)

    async def generate(self, max_tokens: int) -> SimulatedSegment:
        return await self._least_loaded().generate(max_tokens)

    async def score_many(self, samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The proximal-recompute scorer: one batched prefill, costed as one token's latency."""
        if self._sim.token_latency_s > 0:
            await self._time.sleep(self._sim.token_latency_s)
        return [[_TOKEN_LOGPROB] * len(output_ids) for _, output_ids in samples]

    async def abort_generation(self) -> None:
        """Pause with abort and resume at once: what was generating returns, scoring goes on."""
        for server in self.servers:
            server.pause_abort()
        for server in self.servers:
            server.resume()

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        """Pause with abort, reload (`simulate.update_s`), set the version, resume, on every
        server. The simulated weights are not files: `weights` is unused."""
        for server in self.servers:
            server.pause_abort()
        if self._sim.update_s > 0:
            await self._time.sleep(self._sim.update_s)
        for server in self.servers:
            server.version = version
            server.resume()
        self.version = version
        self.report_states()
        return {"reload_s": self._sim.update_s}

    def idle_fraction(self, start: float, now: float) -> float:
        """Share of server time between `start` and `now` with nothing decoding."""
        elapsed = (now - start) * len(self.servers)
        if elapsed <= 0:
            return 0.0
        busy = sum(server.busy_seconds(now) for server in self.servers)
        return max(0.0, 1.0 - busy / elapsed)

    @property
    def tokens_out(self) -> int:
        return sum(server.tokens_out for server in self.servers)

    @property
    def aborted(self) -> int:
        return sum(server.aborted for server in self.servers)
