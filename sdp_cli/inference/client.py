"""Async client over the vLLM servers of a ServerPool: segmented generation, prompt logprobs,
and the weight-update protocol on every server.

Routing picks the ready server with the fewest in-flight requests. Connection errors, timeouts and
5xx answers are retried on another server with exponential backoff; 4xx answers are not (the
request itself is wrong). When no server is ready (all restarting) a request waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from sdp_cli.inference.adapters import adapter_version
from sdp_cli.inference.client_errors import (
    NoServerAvailableError,
    PoisonRequestError,
    RequestFailedError,
    RequestRejectedError,
)
from sdp_cli.inference.connections import ConnectionPool
from sdp_cli.inference.poison import POISON_DEATHS, DeathWitness
from sdp_cli.inference.pool import ServerPool, ServerStatus
from sdp_cli.inference.protocol import (
    ABORT_PATH,
    COMPLETIONS_PATH,
    GENERATE_PATH,
    SERVED_MODEL_NAME,
    GenerateAnswer,
    generate_body,
    parse_generate_answer,
    parse_prefix_logprobs,
    parse_prompt_logprobs,
    prompt_logprobs_body,
)
from sdp_cli.inference.types import Completion, Gate, SamplingParams

BodyFactory = Callable[[], dict[str, Any]]
# (prompt_ids, output_ids)
ScoreItem = tuple[Sequence[int], Sequence[int]]

# A segment that returns "abort" without a single new token this many times in a row means the
# servers abort everything they get; give up rather than spin.
MAX_EMPTY_ABORTS = 50

log = logging.getLogger(__name__)


class InferenceClient:
    def __init__(
        self,
        pool: ServerPool,
        request_timeout_s: float = 120.0,
        *,
        update_timeout_s: float = 120.0,
        max_attempts: int = 8,
        backoff_s: float = 0.25,
        max_backoff_s: float = 4.0,
        server_wait_s: float = 600.0,
        max_model_len: int | None = None,
        eos_token_id: int | None = None,
        model_name: str = SERVED_MODEL_NAME,
        transport: httpx.AsyncBaseTransport | None = None,
        score_continuations: bool = False,
    ) -> None:
        """`transport` replaces the network (tests inject faults with httpx.MockTransport).
        With `score_continuations`, a completion continued after an abort at temperature 1
        asks for the logprobs of its tokens so far, which the continuation's prefill computes
        under the new weights anyway (`Completion.prefix_logprobs`)."""
        self.pool = pool
        self.request_timeout_s = request_timeout_s
        self.update_timeout_s = update_timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.server_wait_s = server_wait_s
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.model_name = model_name
        self.score_continuations = score_continuations
        self._timeout = httpx.Timeout(request_timeout_s, connect=10.0)
        self._transport = transport
        # httpx connections belong to the event loop that opened them; the trainer and the
        # rollout executor may each call from their own loop.
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConnections]
        self._loops = weakref.WeakKeyDictionary()
        self._loops_lock = threading.Lock()

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections this event loop opened."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            connections = self._loops.pop(loop, None)
        if connections is not None:
            await connections.aclose()

    # ---- generation ---------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        gate: Gate | None = None,
    ) -> Completion:
        """Generate up to `max_new_tokens` tokens after `prompt_ids`. A segment the server
        aborts (a weight update paused it) keeps its tokens; the completion continues from
        prompt + tokens so far on any ready server, after `gate()` allows it. `gate` is
        awaited before every segment is sent."""
        completion = Completion()
        limit = await self._context_limit()
        empty_aborts = 0
        while True:
            done = len(completion.output_ids)
            budget = max_new_tokens - done
            if limit is not None:
                # One position short of the context: scoring prompt + output through
                # /v1/completions needs room for its one generated token.
                budget = min(budget, limit - 1 - len(prompt_ids) - done)
            if budget <= 0:
                completion.finish_reason = "length"
                return completion
            if gate is not None:
                await gate()
            # Temperature 1 only: prompt logprobs come from the raw logits, while the
            # recompute scores the tempered distribution tokens are drawn from.
            score_prefix = self.score_continuations and done > 0 and sampling.temperature == 1.0
            answer, attempts = await self._generate_segment(
                prompt_ids + completion.output_ids,
                sampling,
                budget,
                done,
                prefix_start=len(prompt_ids) if score_prefix else None,
            )
            completion.n_requests += attempts
            completion.append(answer.token_ids, answer.logprobs, answer.versions)
            if answer.prefix_logprobs is not None:
                completion.keep_prefix_logprobs(answer.prefix_logprobs, answer.versions)
            if answer.finish_reason != "abort":
                completion.finish_reason = answer.finish_reason
                return completion
            if self._ends_on_stop_token(completion, sampling):
                completion.finish_reason = "stop"
                return completion
            empty_aborts = 0 if answer.token_ids else empty_aborts + 1
            if empty_aborts >= MAX_EMPTY_ABORTS:
                raise RequestFailedError(
                    f"servers aborted a segment {MAX_EMPTY_ABORTS} times without producing a token"
                )

    async def _generate_segment(
        self,
        token_ids: list[int],
        sampling: SamplingParams,
        budget: int,
        done: int,
        prefix_start: int | None = None,
    ) -> tuple[GenerateAnswer, int]:
        """One segment's answer and the HTTP attempts it took; with `prefix_start`, the answer
        carries the logprobs of token_ids[prefix_start:]."""
        fields = sampling.request_fields(budget, done, score_prefix=prefix_start is not None)

        def body() -> dict[str, Any]:
            # A fresh id per attempt: a retried request may land on the same server while its
            # first attempt is still being torn down.
            return generate_body(f"sdp-{uuid.uuid4().hex}", token_ids, fields)

        payload, attempts = await self._with_retries("POST", GENERATE_PATH, body)
        answer = parse_generate_answer(payload)
        adapter = adapter_version(payload.get("model"))
        if adapter is not None:
            # A request keeps the adapter it named to its last token, even one that reached
            # the server after it had loaded the next version (whose spans it would carry).
            answer.versions = [adapter] * len(answer.token_ids)
        if prefix_start is not None:
            answer.prefix_logprobs = parse_prefix_logprobs(
                payload, token_ids, prefix_start, aborted=answer.finish_reason == "abort"
            )
        return answer, attempts

    def _ends_on_stop_token(self, completion: Completion, sampling: SamplingParams) -> bool:
        """An abort can race with the sampling of a stop token; the completion is then over."""
        if not completion.output_ids or len(completion.output_ids) < sampling.min_tokens:
            return False
        last = completion.output_ids[-1]
        if last in sampling.stop_token_ids:
            return True
        return not sampling.ignore_eos and last == self.eos_token_id

    async def _context_limit(self) -> int | None:
        """max_model_len of the servers, asked once from /v1/models when not given."""
        if self.max_model_len is None:
            with contextlib.suppress(Exception):
                payload, _ = await self._with_retries("GET", "/v1/models", None)
                self.max_model_len = int(payload["data"][0]["max_model_len"])
        return self.max_model_len

    # ---- logprobs -----------------------------------------------------------------------

    async def prompt_logprobs(self, ids: list[int], start: int) -> list[float]:
        """Logprob of ids[i] given ids[:i] for every i >= start, under the weights the serving
        server holds now."""
        if not 1 <= start <= len(ids):
            raise ValueError(f"start must be in [1, {len(ids)}], got {start}")
        if start == len(ids):
            return []
        (logprobs,) = await self._prompt_logprobs_request([list(ids)], [start])
        return logprobs

    async def score(self, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
        """Logprob of each output token given the prompt and the output before it."""
        return await self.prompt_logprobs(list(prompt_ids) + list(output_ids), len(prompt_ids))

    async def score_many(
        self, samples: Sequence[ScoreItem], temperature: float = 1.0
    ) -> list[list[float]]:
        """`score` for many (prompt_ids, output_ids) pairs, in order: one request per ready
        server, each carrying its share of the samples as a prompt list. At a `temperature`
        other than 1 the logprobs are of softmax(z/T), the distribution tokens are sampled from
        (each request then carries the whole vocabulary per position)."""
        sequences = [list(prompt) + list(output) for prompt, output in samples]
        starts = [len(prompt) for prompt, _ in samples]
        if any(start < 1 for start in starts):
            raise ValueError("every sample needs a prompt of at least one token")
        shares = split_evenly(len(sequences), max(1, len(self.pool.ready_addresses())))
        answers = await asyncio.gather(
            *(
                self._prompt_logprobs_request(sequences[part], starts[part], temperature)
                for part in shares
            )
        )
        return [logprobs for answer in answers for logprobs in answer]

    async def _prompt_logprobs_request(
        self, sequences: list[list[int]], starts: list[int], temperature: float = 1.0
    ) -> list[list[float]]:
        whole = temperature != 1.0
        payload, _ = await self._with_retries(
            "POST",
            COMPLETIONS_PATH,
            lambda: prompt_logprobs_body(sequences, self.model_name, whole_distribution=whole),
        )
        return parse_prompt_logprobs(payload, sequences, starts, temperature)

    # ---- transport ----------------------------------------------------------------------

    def _connections(self) -> _LoopConnections:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            connections = self._loops.get(loop)
            if connections is None:
                connections = _LoopConnections(self._timeout, self._transport)
                self._loops[loop] = connections
            return connections

    def http(self) -> httpx.AsyncClient:
        """A shared client of this event loop for the few control calls (weight updates,
        versions, aborts: `weight_sync.disk`)."""
        return self._connections().shared

    async def _acquire(self, avoid: set[int]) -> ServerStatus:
        """A routable server, waiting (up to server_wait_s) while all are starting or
        restarting."""
        deadline = time.monotonic() + self.server_wait_s
        delay = 0.02
        while True:
            server = self.pool.acquire(avoid)
            if server is not None:
                return server
            if len(self.pool) == 0:
                raise NoServerAvailableError("no inference server is registered")
            if self.pool.all_dead():
                raise NoServerAvailableError(
                    "no inference server is alive:\n" + self.pool.why_all_dead()
                )
            if time.monotonic() > deadline:
                raise NoServerAvailableError(
                    f"no inference server became ready within {self.server_wait_s:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)

    async def _with_retries(
        self, method: str, path: str, body: BodyFactory | None
    ) -> tuple[dict[str, Any], int]:
        """The JSON answer and the number of attempts it took. A request that was being served
        when a server died is sent again only while no other such suspect is in flight, and
        is refused as poison once present at POISON_DEATHS deaths (inference/poison.py)."""
        connections = self._connections()
        avoid: set[int] = set()
        errors: list[str] = []
        witness = DeathWitness()
        for attempt in range(self.max_attempts):
            # Only once a server is routable again is the death it served counted for sure.
            server = await self._acquire(avoid)
            if witness.deaths(self.pool):
                self.pool.release(server.index, server.adapter)
                async with connections.suspects:
                    self._refuse_poison(witness, path, errors)
                    server = await self._acquire(avoid)
                    answer = await self._attempt_and_release(
                        connections, server, method, path, body, errors, witness, fresh=True
                    )
            else:
                answer = await self._attempt_and_release(
                    connections, server, method, path, body, errors, witness
                )
            if answer is not None:
                return answer, attempt + 1
            avoid.add(server.index)
            await asyncio.sleep(self._backoff(attempt))
        self._refuse_poison(witness, path, errors)
        raise RequestFailedError(
            f"{path} failed {self.max_attempts} times: " + "; ".join(errors[-3:])
        )

    async def _attempt_and_release(
        self,
        connections: _LoopConnections,
        server: ServerStatus,
        method: str,
        path: str,
        body: BodyFactory | None,
        errors: list[str],
        witness: DeathWitness,
        fresh: bool = False,
    ) -> dict[str, Any] | None:
        """One attempt on the acquired `server`, which is released after it: the JSON answer,
        or None (the error noted) to retry. A `fresh` attempt opens a connection of its own:
        a kept-alive connection to a server that already died fails like one the server died
        on, and only the second tells that the request reached it."""
        try:
            payload = body() if body is not None else None
            if payload is not None and server.adapter is not None:
                # LoRA: the adapter of the version this server holds (inference/adapters.py).
                payload["model"] = server.adapter
            return await self._attempt(
                connections, server, method, path, payload, errors, witness, fresh
            )
        finally:
            self.pool.release(server.index, server.adapter)

    async def _attempt(
        self,
        connections: _LoopConnections,
        server: ServerStatus,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        errors: list[str],
        witness: DeathWitness,
        fresh: bool,
    ) -> dict[str, Any] | None:
        connection = connections.fresh() if fresh else connections.connection(server.address)
        try:
            # httpx's own timeouts bound each socket operation; this bounds the request.
            async with asyncio.timeout(self.request_timeout_s), connection as http:
                response = await http.request(method, server.address + path, json=payload)
        except (TimeoutError, httpx.TimeoutException) as exc:
            if not isinstance(exc, httpx.ConnectTimeout):
                witness.note_reached(server)
            errors.append(f"{server.address}: no answer within {self.request_timeout_s} s")
            await self._abort_quietly(connections.shared, server.address, payload)
            return None
        except httpx.TransportError as exc:
            # A refused connection never reached the server; a dropped one did.
            if not isinstance(exc, httpx.ConnectError):
                witness.note_reached(server)
            errors.append(f"{server.address}: {type(exc).__name__} {exc}")
            self.pool.report_unreachable(server.index)
            return None
        if response.status_code < 400:
            return response.json()
        if response.status_code < 500:
            raise RequestRejectedError(
                f"{server.address}{path} rejected the request "
                f"({response.status_code}): {response.text[:500]}"
            )
        witness.note_reached(server)
        errors.append(f"{server.address}: HTTP {response.status_code}")
        return None

    def _refuse_poison(self, witness: DeathWitness, path: str, errors: list[str]) -> None:
        deaths = witness.deaths(self.pool)
        if deaths >= POISON_DEATHS:
            raise PoisonRequestError(
                f"{path}: refused as a poison request: servers died {deaths} times while "
                "serving it (the last time with no other suspect request in flight); last "
                "errors: " + "; ".join(errors[-2:])
            )

    async def _abort_quietly(
        self, http: httpx.AsyncClient, address: str, payload: dict[str, Any] | None
    ) -> None:
        """Stop a timed-out generation on its server so it does not keep a slot busy."""
        request_id = (payload or {}).get("request_id")
        if request_id is None:
            return
        # The server names the request `generate-tokens-<id>` internally; send both forms.
        ids = [request_id, f"generate-tokens-{request_id}"]
        with contextlib.suppress(httpx.HTTPError, OSError):
            await http.post(f"{address}{ABORT_PATH}", json={"request_ids": ids}, timeout=5.0)


class _LoopConnections:
    """The connections of one event loop: a pool for requests that may run concurrently by the
    hundred (generation, logprobs), and one shared client for rare control calls."""

    def __init__(self, timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport | None) -> None:
        self.shared = httpx.AsyncClient(timeout=timeout, transport=transport)
        self._transport = transport
        # Held by a request while it is sent again after a server died serving it.
        self.suspects = asyncio.Lock()
        self._pool = ConnectionPool(timeout) if transport is None else None

    def fresh(self) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        """A client with no connection yet, closed after its one `async with`."""
        if self._transport is not None:
            # An injected transport (a test's fault injector) keeps no connections, and
            # closing a client would close it.
            return contextlib.nullcontext(self.shared)
        return httpx.AsyncClient(timeout=self.shared.timeout)

    def connection(self, address: str) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        if self._pool is None:
            return contextlib.nullcontext(self.shared)
        return self._pool.connection(address)

    async def aclose(self) -> None:
        await self.shared.aclose()
        if self._pool is not None:
            await self._pool.aclose()


def split_evenly(count: int, parts: int) -> list[slice]:
    """At most `parts` contiguous, non-empty slices of range(count) whose sizes differ by at
    most one."""
    parts = min(parts, count)
    size, extra = divmod(count, parts) if parts else (0, 0)
    slices: list[slice] = []
    start = 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices
