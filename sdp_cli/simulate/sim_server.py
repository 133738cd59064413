"""Simulated inference servers that behave like vLLM where staleness is concerned.

Each server decodes at most `server_batch` requests at once (the rest wait for a slot); a
request's tokens each take a lognormal time with mean `token_latency_s` plus
`token_latency_per_seq_s` for each request decoding at that moment (itself included). With
`prefill_s` > 0, a request holding a slot first has its prompt prefilled: a server prefills one
request at a time, first come first served, each for a lognormal time with mean `prefill_s`, and
its decoding requests make no progress meanwhile (a token's time stops while its server
prefills), as a vLLM step that takes in new prompts is slower by their prefill. Every segment is
prefilled: a resumed request re-reads its prompt, the prefix cache having been cleared at the
weight update. A pause in abort mode works like vLLM's: requests decoding return at once with
the tokens produced so far and `finish_reason="abort"`, requests waiting for a slot or for their
prefill return with none, requests that arrive while paused wait until resume, and everything
decoded after a weight update carries the new version. The client turns an abort into a new
segment. A pause with keep (train.update_mode=keep) freezes requests instead: a token in
progress completes only after the resume, and the request goes on where it was, without a new
prefill; tokens completed after the reload carry the new version, so one segment can span
versions (`SimulatedSegment.versions`).

Logprobs stand for the weights that computed them: a token's is `simulated_logprob(position,
version)`, from its sampling, from a scoring call (under the version the servers hold when it
answers), or from the prefill of a continuation that asked for its prefix's scores.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sdp_cli.config.simulate_settings import SimulateConfig
from sdp_cli.events.event_log import EventSink, NullEventLog
from sdp_cli.events.event_schema import ServerStateEvent
from sdp_cli.simulate.clock import SimTime
from sdp_cli.simulate.proximal_check import simulated_logprobs

# Stand-in token ids: the simulation tracks versions and timing, not text.
_VOCAB = 64
# A token this close to its end is done: the sums of stall and token times round off.
_SLACK_S = 1e-6


@dataclass
class SimulatedSegment:
    token_ids: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str  # "length" or "abort"
    # Per output token, the version that sampled it; None when all are `version`. A request
    # frozen by a pause with keep spans the reload.
    versions: list[int] | None = None
    # The logprobs of the output tokens before the segment under `version`, from its prefill,
    # when the request asked for them and brought tokens (a continuation's scores).
    prefix_logprobs: list[float] | None = None

    def token_versions(self) -> list[int]:
        return self.versions if self.versions is not None else [self.version] * len(self.token_ids)


@dataclass(eq=False)
class _Decoding:
    """One request holding a decode slot, prefilling or decoding; a pause with abort resolves
    `aborted`, and `turn` resolves when its prefill may start (when it had to queue for it)."""

    aborted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    turn: asyncio.Future[None] | None = None


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
        # Requests holding a slot (prefilling or decoding). A dict, not a set: aborts must
        # resolve in a reproducible order.
        self._active: dict[_Decoding, None] = {}
        # Requests past their prefill: the batch whose size sets the per-token latency.
        self._decoders = 0
        # The request whose prefill runs, and those queued behind it, first come first served.
        self._prefill_owner: _Decoding | None = None
        self._prefill_queue: deque[_Decoding] = deque()
        # Prefill time so far (finished stretches, and the one running since `_stall_since`):
        # decoding makes no progress during it. `_unstalled` resolves when the running one ends.
        self._stalled_s = 0.0
        self._stall_since: float | None = None
        self._unstalled: asyncio.Future[None] | None = None
        # When the running prefill ends; None until its duration is drawn.
        self._prefill_ends_at: float | None = None
        # Requests waiting or decoding, for routing.
        self.load = 0
        self.busy_s = 0.0
        self._busy_since: float | None = None
        self._sigma = max(sim.latency_jitter, 0.0)
        self.tokens_out = 0
        self.aborted = 0
        # Counts pauses with abort, so a request waiting for a slot knows it was aborted.
        self._aborts = 0
        # Resolved by the resume that ends a pause with keep; None while not paused so.
        self._resumed: asyncio.Future[None] | None = None

    async def generate(
        self, max_tokens: int, position: int = 0, score_prefix: bool = False
    ) -> SimulatedSegment:
        """Up to `max_tokens` tokens from output `position` on; with `score_prefix`, the
        answer also carries the logprobs of the `position` tokens before (when it has tokens)."""
        self.load += 1
        aborts_at_arrival = self._aborts
        try:
            async with self._slots:
                while not self._open.is_set():
                    await self._open.wait()
                if self._aborts != aborts_at_arrival:
                    self.aborted += 1
                    return self._segment(0, self.version, "abort")
                segment = await self._decode(max_tokens, position)
        finally:
            self.load -= 1
        if score_prefix and segment.token_ids:
            # The prefill ran under the segment's version: a request never spans a reload.
            segment.prefix_logprobs = simulated_logprobs(0, position, segment.version)
        return segment

    async def wait_serving(self) -> None:
        """Until the server is not paused (a request sent meanwhile waits in its queue)."""
        while not self._open.is_set():
            await self._open.wait()

    async def _decode(self, max_tokens: int, position: int) -> SimulatedSegment:
        version = self.version
        sim = self._sim
        if sim.prefill_s <= 0 and sim.token_latency_s <= 0 and sim.token_latency_per_seq_s <= 0:
            return self._segment(max_tokens, version, "length", position)
        request = _Decoding()
        self._start_busy(request)
        try:
            if sim.prefill_s > 0 and not await self._prefill(request):
                return self._segment(0, version, "abort")
            if sim.token_latency_s <= 0 and sim.token_latency_per_seq_s <= 0:
                return self._segment(max_tokens, version, "length", position)
            spans: list[list[int]] = []
            produced, reason = await self._tokens(request, max_tokens, spans)
            return self._segment(produced, version, reason, position, spans)
        finally:
            self._end_busy(request)

    async def _tokens(
        self, request: _Decoding, max_tokens: int, spans: list[list[int]]
    ) -> tuple[int, str]:
        """Decode up to `max_tokens` tokens; how many, and "length" or "abort". `spans` gets
        [version, tokens] runs: the version the server holds when each token completes."""
        # Only a server that prefills can stall a token: without, one wait per token.
        stalls = self._sim.prefill_s > 0
        self._decoders += 1
        produced = 0
        try:
            while produced < max_tokens:
                # The requests decoding on a server share its steps: more of them, slower tokens.
                latency = self._draw(
                    self._sim.token_latency_s + self._sim.token_latency_per_seq_s * self._decoders
                )
                started = self._time.now() if stalls else 0.0
                stalled_before = self._stalled_at(started) if stalls else 0.0
                # Waiting on the future itself: no task per token, which wait_for would make.
                await asyncio.wait((request.aborted,), timeout=self._time.loop_seconds(latency))
                if stalls:
                    await self._wait_out_prefills(request, latency, started, stalled_before)
                if self._resumed is not None and not request.aborted.done():
                    # Frozen by a pause with keep: the token completes after the reload.
                    await asyncio.wait(
                        (request.aborted, self._resumed), return_when=asyncio.FIRST_COMPLETED
                    )
                if request.aborted.done():
                    return produced, "abort"
                produced += 1
                if spans and spans[-1][0] == self.version:
                    spans[-1][1] += 1
                else:
                    spans.append([self.version, 1])
        finally:
            self._decoders -= 1
        return produced, "length"

    def _draw(self, mean: float) -> float:
        """Lognormal with that mean: E[exp(N(mu, σ²))] = exp(mu + σ²/2)."""
        return self._rng.lognormvariate(math.log(mean) - self._sigma**2 / 2, self._sigma)

    # ---- prefill ----------------------------------------------------------------------------

    async def _prefill(self, request: _Decoding) -> bool:
        """Wait for this server's prefills queued ahead, then prefill `request` (about
        `prefill_s`) while its decoding stalls. False when a pause with abort came first."""
        if self._prefill_owner is None:
            self._take_prefill(request)
        else:
            request.turn = asyncio.get_running_loop().create_future()
            self._prefill_queue.append(request)
        try:
            if request.turn is not None:
                await asyncio.wait(
                    (request.aborted, request.turn), return_when=asyncio.FIRST_COMPLETED
                )
            if not request.aborted.done():
                duration = self._draw(self._sim.prefill_s)
                self._prefill_ends_at = self._time.now() + duration
                await asyncio.wait((request.aborted,), timeout=self._time.loop_seconds(duration))
        finally:
            self._leave_prefill(request)
        return not request.aborted.done()

    def _take_prefill(self, request: _Decoding) -> None:
        self._prefill_owner = request
        self._prefill_ends_at = None
        if self._stall_since is None:
            self._stall_since = self._time.now()
            self._unstalled = asyncio.get_running_loop().create_future()

    def _leave_prefill(self, request: _Decoding) -> None:
        """Hand the prefill on to the next request queued (decoding stays stalled), or end the
        stall; a request aborted while queued just leaves the queue."""
        if self._prefill_owner is not request:
            if request in self._prefill_queue:
                self._prefill_queue.remove(request)
            return
        if self._prefill_queue:
            following = self._prefill_queue.popleft()
            self._prefill_owner = following
            self._prefill_ends_at = None
            if following.turn is not None and not following.turn.done():
                following.turn.set_result(None)
            return
        self._prefill_owner = None
        self._prefill_ends_at = None
        if self._stall_since is not None:
            self._stalled_s += self._time.now() - self._stall_since
            self._stall_since = None
        if self._unstalled is not None:
            self._unstalled.set_result(None)
            self._unstalled = None

    def _stalled_at(self, now: float) -> float:
        """Seconds this server has spent prefilling up to `now`."""
        running = now - self._stall_since if self._stall_since is not None else 0.0
        return self._stalled_s + running

    async def _wait_out_prefills(
        self, request: _Decoding, latency: float, started: float, stalled_before: float
    ) -> None:
        """A token started at `started` needs `latency` seconds of server time without a
        prefill: after its timer, wait out the prefill time that overlapped it and the
        prefills still running. Returns at once when no prefill touched the token."""
        if self._stall_since is None and self._stalled_s == stalled_before:
            return
        # Done when the server's time spent not prefilling reaches `target`.
        target = started - stalled_before + latency
        while not request.aborted.done():
            unstalled, ends_at = self._unstalled, self._prefill_ends_at
            now = self._time.now()
            if unstalled is None or self._stall_since is None:
                wait_s = target - (now - self._stalled_s)
                if wait_s <= _SLACK_S:
                    return
            elif self._prefill_queue or ends_at is None:
                # More prefills follow the running one: one wake-up when they are all done.
                await asyncio.wait(
                    (request.aborted, unstalled), return_when=asyncio.FIRST_COMPLETED
                )
                continue
            else:
                # The last prefill queued ends at `ends_at`, and the token's rest comes after.
                wait_s = ends_at - now + target - (self._stall_since - self._stalled_s)
            await asyncio.wait((request.aborted,), timeout=self._time.loop_seconds(max(wait_s, 0)))

    def _segment(
        self,
        n_tokens: int,
        version: int,
        finish_reason: str,
        position: int = 0,
        spans: list[list[int]] | None = None,
    ) -> SimulatedSegment:
        if spans and (len(spans) > 1 or spans[0][0] != version):
            return self._spanning_segment(n_tokens, version, finish_reason, position, spans)
        self.tokens_out += n_tokens
        offset = self.tokens_out
        return SimulatedSegment(
            token_ids=[(offset + i) % _VOCAB for i in range(n_tokens)],
            logprobs=simulated_logprobs(position, position + n_tokens, version),
            version=version,
            finish_reason=finish_reason,
        )

    def _spanning_segment(
        self,
        n_tokens: int,
        version: int,
        finish_reason: str,
        position: int,
        spans: list[list[int]],
    ) -> SimulatedSegment:
        """A segment whose tokens were sampled under more than one version (pause with keep):
        each token's logprob is of the weights that sampled it."""
        self.tokens_out += n_tokens
        offset = self.tokens_out
        versions: list[int] = []
        logprobs: list[float] = []
        for span_version, count in spans:
            start = position + len(versions)
            logprobs += simulated_logprobs(start, start + count, span_version)
            versions += [span_version] * count
        return SimulatedSegment(
            token_ids=[(offset + i) % _VOCAB for i in range(n_tokens)],
            logprobs=logprobs,
            version=version,
            finish_reason=finish_reason,
            versions=versions,
        )

    def pause_keep(self) -> None:
        """`POST /pause?mode=keep`: requests freeze where they are until the resume."""
        self._open.clear()
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def pause_abort(self) -> None:
        """`POST /pause?mode=abort`: in-flight requests return what they have so far."""
        self._open.clear()
        self._aborts += 1
        for request in list(self._active):
            if not request.aborted.done():
                request.aborted.set_result(None)
                self.aborted += 1

    def resume(self) -> None:
        self._open.set()
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def _start_busy(self, request: _Decoding) -> None:
        if not self._active:
            self._busy_since = self._time.now()
        self._active[request] = None

    def _end_busy(self, request: _Decoding) -> None:
        self._active.pop(request, None)
        if not self._active and self._busy_since is not None:
            self.busy_s += self._time.now() - self._busy_since
            self._busy_since = None

    def busy_seconds(self, now: float) -> float:
        """Simulated seconds with at least one request prefilling or decoding, up to `now`."""
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
        # train.update_mode=keep: a reload pauses with keep instead of abort.
        self.keep_requests = False

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

    async def sleep(self, sim_seconds: float) -> None:
        """Wait `sim_seconds` of simulated time (an environment's step)."""
        await self._time.sleep(sim_seconds)

    def _least_loaded(self) -> SimulatedServer:
        return min(self.servers, key=lambda server: server.load)

    async def generate(
        self, max_tokens: int, position: int = 0, score_prefix: bool = False
    ) -> SimulatedSegment:
        return await self._least_loaded().generate(max_tokens, position, score_prefix)

    async def score_many(self, samples: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The proximal-recompute scorer: one batched prefill, costed as one token's latency,
        under the weights the server holds when it answers (a paused server answers after it
        resumes, as vLLM's queue would), so a score that races a reload shows its version."""
        server = self._least_loaded()
        if self._sim.token_latency_s > 0:
            await self._time.sleep(self._sim.token_latency_s)
        await server.wait_serving()
        version = server.version
        return [simulated_logprobs(0, len(output_ids), version) for _, output_ids in samples]

    async def abort_generation(self) -> None:
        """Pause with abort and resume at once: what was generating returns, scoring goes on."""
        for server in self.servers:
            server.pause_abort()
        for server in self.servers:
            server.resume()

    async def load_weights(self, weights: Path | None, version: int) -> dict[str, float]:
        """Pause with abort (with keep under `keep_requests`), reload (`simulate.update_s`),
        set the version, resume, on every server. The simulated weights are not files:
        `weights` is unused."""
        for server in self.servers:
            if self.keep_requests:
                server.pause_keep()
            else:
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
