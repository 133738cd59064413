"""Kill a real vLLM server while it certainly holds unfinished requests, for the tests that
prove a killed server's requests are resubmitted (tests/integration/test_launcher_vllm.py,
and tests/integration/ray_scenarios.py inside its network namespace)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from sdp_cli.inference import ServerPool
from sdp_cli.launcher.fleet import requests_on_server

T = TypeVar("T")

# Long enough for the client to read every answer the frozen server had already written.
DRAIN_S = 1.0


async def wait_for_requests_on(address: str, timeout_s: float = 30.0) -> None:
    """Until the server's /metrics count a running or waiting request."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                metrics = await http.get(f"{address}/metrics", timeout=5.0)
            except httpx.TimeoutException:
                # A server decoding 32 sequences on a loaded machine can answer late (seen in
                # CI): no answer yet is no request seen yet.
                continue
            if requests_on_server(metrics.text) > 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"no request reached {address} within {timeout_s} s")


async def kill_while_serving(
    pool: ServerPool,
    index: int,
    pid: int,
    start_round: Callable[[], Awaitable[T]],
    rounds: int = 5,
) -> T:
    """Run `start_round()` and SIGKILL server `index` (process `pid`) while the client waits on
    at least one of its answers; the round's result.

    Seeing requests in /metrics is not enough: CI saw both the metrics and the client's count
    say "in flight" while the victim had already written all its answers, so nothing was lost.
    The server is frozen (SIGSTOP) first, and killed only if the client still waits on it once
    every answer already written has been read; a server that had finished its share is
    resumed and the round generated again."""
    address = pool.status(index).address
    for _ in range(rounds):
        generation = asyncio.ensure_future(start_round())
        seen = asyncio.ensure_future(wait_for_requests_on(address))
        await asyncio.wait({generation, seen}, return_when=asyncio.FIRST_COMPLETED)
        if not seen.done():
            seen.cancel()
            await generation
            continue
        if seen.exception() is not None:
            # Retrieve the generation's outcome before failing: a failed task left behind logs
            # its traceback whenever the garbage collector finds it.
            generation.cancel()
            await asyncio.gather(generation, return_exceptions=True)
            seen.result()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(DRAIN_S)
        if pool.status(index).in_flight == 0:
            os.kill(pid, signal.SIGCONT)
            await generation
            continue
        os.kill(pid, signal.SIGKILL)
        return await generation
    raise AssertionError(f"server {index} finished its share of every round before the kill")
