"""The simulated server's prefill (`simulate.prefill_s`): one prompt at a time per server, first
come first served, decoding stalled meanwhile, and aborted like a request waiting for a slot."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from sdp_cli.config import load_config
from sdp_cli.config.simulate_settings import SimulateConfig
from sdp_cli.simulate import run_simulation
from sdp_cli.simulate.clock import SimTime, VirtualTimeLoop
from sdp_cli.simulate.sim_server import SimulatedSegment, SimulatedServer

T = TypeVar("T")

PREFILL_S = 0.1
TOKEN_S = 0.01


def in_virtual_time(main: Callable[[], Awaitable[T]]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def server(**timing: Any) -> SimulatedServer:
    """One server without jitter: a prefill takes exactly PREFILL_S, a token TOKEN_S."""
    sim = SimulateConfig(prefill_s=PREFILL_S, token_latency_s=TOKEN_S, latency_jitter=0.0, **timing)
    return SimulatedServer(0, sim, random.Random(0), SimTime(0.0))


def simulate(*overrides: str) -> dict[str, Any]:
    """A simulation's summary without its wall-clock fields (the same seed gives the same)."""
    result = run_simulation(load_config(None, list(overrides)))
    return {k: v for k, v in result.items() if k not in ("wall_s", "cpu_us_per_rollout")}


def now() -> float:
    return asyncio.get_running_loop().time()


async def finished_at(srv: SimulatedServer, max_tokens: int) -> tuple[float, SimulatedSegment]:
    segment = await srv.generate(max_tokens)
    return now(), segment


def test_requests_arriving_together_wait_for_every_prefill_of_the_burst() -> None:
    async def burst() -> list[tuple[float, SimulatedSegment]]:
        srv = server()
        return await asyncio.gather(*(finished_at(srv, 5) for _ in range(4)))

    results = in_virtual_time(burst)
    # The first prompt read decodes only after the other three are read too: 4 prefills, then
    # 5 tokens each, decoded side by side.
    assert [t for t, _ in results] == pytest.approx([4 * PREFILL_S + 5 * TOKEN_S] * 4)
    assert all(len(s.token_ids) == 5 and s.finish_reason == "length" for _, s in results)


def test_a_decoding_request_stalls_while_another_is_prefilled() -> None:
    async def overlap() -> tuple[float, float]:
        srv = server()
        first = asyncio.ensure_future(finished_at(srv, 10))
        # The first decodes from 0.1; at 0.155 its sixth token is half made.
        await asyncio.sleep(0.155)
        second = asyncio.ensure_future(finished_at(srv, 10))
        (first_end, _), (second_end, _) = await asyncio.gather(first, second)
        return first_end, second_end

    first_end, second_end = in_virtual_time(overlap)
    # Alone it would end at 0.1 + 10 × 0.01 = 0.2; the other's prefill (0.155 to 0.255)
    # holds its token in progress and adds 0.1.
    assert first_end == pytest.approx(0.2 + PREFILL_S)
    assert second_end == pytest.approx(0.155 + PREFILL_S + 10 * TOKEN_S)


def test_a_pause_with_abort_aborts_requests_prefilling_or_waiting_to() -> None:
    async def abort_mid_prefill() -> tuple[list[SimulatedSegment], float, float, int]:
        srv = server()
        requests = [asyncio.ensure_future(srv.generate(10)) for _ in range(3)]
        # 0.15: the first was read and waits for the second's prefill; the third is queued.
        await asyncio.sleep(0.15)
        srv.pause_abort()
        segments = list(await asyncio.gather(*requests))
        aborted_at = now()
        srv.resume()
        # Nothing is left holding the prefill: a new request is read and decoded at once.
        after, _ = await finished_at(srv, 2)
        return segments, aborted_at, after, srv.aborted

    segments, aborted_at, after, aborted = in_virtual_time(abort_mid_prefill)
    assert [(len(s.token_ids), s.finish_reason) for s in segments] == [(0, "abort")] * 3
    assert aborted_at == pytest.approx(0.15)
    assert aborted == 3
    assert after == pytest.approx(0.15 + PREFILL_S + 2 * TOKEN_S)


def test_no_prefill_leaves_the_simulation_as_it_was() -> None:
    default = simulate("train.steps=6")
    assert simulate("train.steps=6", "simulate.prefill_s=0") == default
    prefilled = simulate("train.steps=6", "simulate.prefill_s=0.002")
    # Same seed, same run; and reading prompts costs time.
    assert simulate("train.steps=6", "simulate.prefill_s=0.002") == prefilled
    assert prefilled["steps"] == 6
    assert prefilled["samples_per_s"] < default["samples_per_s"]


def test_prefill_alone_takes_simulated_time() -> None:
    no_tokens = ("simulate.token_latency_s=0", "simulate.token_latency_per_seq_s=0")
    result = simulate("train.steps=3", "simulate.prefill_s=0.01", *no_tokens)
    assert result["steps"] == 3
    assert result["sim_time_s"] > simulate("train.steps=3", *no_tokens)["sim_time_s"]
