"""The inference client against real vLLM CPU servers (the session's `vllm_fleet`, two servers
with the tiny model): generation, stop tokens, weight updates in the middle of completions,
reloads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from sdp_cli.inference import Completion, InferenceClient, SamplingParams
from sdp_cli.launcher import ServerFleet
from sdp_cli.weight_sync.disk import DiskTransport

pytestmark = pytest.mark.vllm

EOS = 2
PROMPT = [1, 5, 6, 7, 8]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Reported:
    """One /inference/v1/generate exchange as the server answered it."""

    request_ids: list[int]
    answer_ids: list[int]
    spans: list[dict[str, Any]]


class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes requests through and keeps each generate answer, to compare the client's joined
    completion with what the servers themselves reported."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.reports: list[Reported] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/generate"):
            return response
        content = await response.aread()
        choice = json.loads(content)["choices"][0]
        self.reports.append(
            Reported(
                request_ids=json.loads(request.content)["token_ids"],
                answer_ids=choice["token_ids"],
                spans=choice["weight_versions"] or [],
            )
        )
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self.inner.aclose()


def versions_reported_for(
    prompt: list[int], completion: Completion, reports: list[Reported]
) -> list[int]:
    """Per-token versions rebuilt from the raw answers of the requests that produced this
    completion: each request's token_ids is the prompt plus the completion's tokens so far."""
    versions: list[int] = []
    while len(versions) < len(completion.output_ids):
        sent = prompt + completion.output_ids[: len(versions)]
        report = next(r for r in reports if r.request_ids == sent and r.answer_ids)
        segment = [0] * len(report.answer_ids)
        for span in report.spans:
            for i in range(span["start"], span["end"]):
                segment[i] = 0 if span["version"] == "default" else int(span["version"])
        versions += segment
    return versions


def current_version(fleet: ServerFleet) -> int:
    return fleet.pool.target().version


def test_generation_returns_matching_ids_logprobs_and_versions(vllm_fleet: ServerFleet) -> None:
    version = current_version(vllm_fleet)

    async def go() -> tuple[Completion, list[float]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            completion = await client.generate(PROMPT, SamplingParams(seed=7), 24)
            return completion, await client.score(PROMPT, completion.output_ids)

    completion, scored = run(go())
    n = len(completion.output_ids)
    assert 1 <= n <= 24
    assert len(completion.logprobs) == n and len(completion.versions) == n
    assert completion.versions == [version] * n
    assert completion.segments == [(version, 0, n)] and completion.n_segments == 1
    if completion.finish_reason == "length":
        assert n == 24
    else:
        assert completion.finish_reason == "stop" and completion.output_ids[-1] == EOS
    assert all(lp <= 0.0 for lp in completion.logprobs)
    assert completion.logprobs == pytest.approx(scored, abs=1e-3)


def test_stop_tokens_and_eos_end_completions(vllm_fleet: ServerFleet) -> None:
    stop = tuple(range(20, 40))

    async def go() -> tuple[list[Completion], list[Completion]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            stopped = await asyncio.gather(
                *(
                    client.generate(PROMPT, SamplingParams(seed=s, stop_token_ids=stop), 64)
                    for s in range(8)
                )
            )
            # EOS has probability ~1/64 per token under the random model: over 16 × 96 tokens
            # some completions sample it, and each must end right there.
            free = await asyncio.gather(
                *(client.generate(PROMPT, SamplingParams(seed=100 + s), 96) for s in range(16))
            )
            return list(stopped), list(free)

    stopped, free = run(go())
    for completion in stopped:
        assert completion.finish_reason == "stop"
        assert completion.output_ids[-1] in stop
        assert not set(completion.output_ids[:-1]) & set(stop)
    ended_on_eos = [c for c in free if c.finish_reason == "stop"]
    assert ended_on_eos, "no completion sampled EOS; the seeds should make some"
    for completion in free:
        assert EOS not in completion.output_ids[:-1]
        assert (completion.output_ids[-1] == EOS) == (completion.finish_reason == "stop")


def test_a_completion_up_to_the_context_limit_can_still_be_scored(vllm_fleet: ServerFleet) -> None:
    limit = vllm_fleet.server.max_model_len

    async def go() -> tuple[Completion, list[float]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            sampling = SamplingParams(seed=3, ignore_eos=True)
            completion = await client.generate(PROMPT, sampling, 10 * limit)
            return completion, await client.score(PROMPT, completion.output_ids)

    completion, scored = run(go())
    assert completion.finish_reason == "length"
    assert len(PROMPT) + len(completion.output_ids) == limit - 1
    assert completion.logprobs == pytest.approx(scored, abs=1e-3)


class HostCounter(httpx.AsyncBaseTransport):
    """Passes requests through and counts /v1/completions requests per server."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.completions_by_port: dict[int | None, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            port = request.url.port
            self.completions_by_port[port] = self.completions_by_port.get(port, 0) + 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_score_many_equals_scoring_each_sample_and_spreads_over_the_servers(
    vllm_fleet: ServerFleet,
) -> None:
    prompts = [[1, 5 + i, 6 + i % 3, 7] for i in range(8)]
    counter = HostCounter()

    Scores = list[list[float]]

    async def go() -> tuple[Scores, Scores, Scores, dict[int | None, int]]:
        async with InferenceClient(vllm_fleet.pool, transport=counter) as client:
            completions = await asyncio.gather(
                *(client.generate(p, SamplingParams(seed=i), 12) for i, p in enumerate(prompts))
            )
            outputs = [c.output_ids for c in completions]
            counter.completions_by_port.clear()
            together = await client.score_many(list(zip(prompts, outputs, strict=True)))
            spread = dict(counter.completions_by_port)
            one_by_one = [await client.score(p, o) for p, o in zip(prompts, outputs, strict=True)]
            return together, one_by_one, [c.logprobs for c in completions], spread

    together, one_by_one, sampled, spread = run(go())
    assert [len(t) for t in together] == [len(s) for s in sampled]
    for batched, single, behaviour in zip(together, one_by_one, sampled, strict=True):
        assert batched == pytest.approx(single, abs=1e-4)
        # Same weights as the ones that sampled: the scores are the behaviour logprobs.
        assert batched == pytest.approx(behaviour, abs=1e-3)
    # One prompt-list request per ready server.
    assert sorted(spread.values()) == [1, 1]


def test_weight_update_mid_completion_gives_segments_with_the_servers_versions(
    vllm_fleet: ServerFleet, write_tiny_weights: Callable[..., Path]
) -> None:
    """Also: each continuation brings its earlier tokens' logprobs under the new weights
    (score_continuations), the scores a proximal recompute under them would take."""
    first, second = write_tiny_weights(1), write_tiny_weights(2)
    recorder = RecordingTransport()
    # Enough completions that some are still generating after the sleep below on an idle
    # machine too (the tiny model decodes 240 tokens of a handful of requests in about 0.5 s).
    prompts = [[1, 5 + i, 6, 7] for i in range(48)]
    length = 240

    async def go() -> tuple[int, list[Completion], list[list[float]], list[list[float]]]:
        async with InferenceClient(
            vllm_fleet.pool, transport=recorder, score_continuations=True
        ) as client:
            old = current_version(vllm_fleet) + 1
            await DiskTransport(client).load_weights(str(first), old)
            tasks = [
                asyncio.create_task(
                    # ignore_eos, not min_tokens: min_tokens masks EOS before sampling, and
                    # the servers report logprobs of the distribution sampled from.
                    client.generate(p, SamplingParams(seed=i, ignore_eos=True), length)
                )
                for i, p in enumerate(prompts)
            ]
            # Let every completion get some tokens under `old`, then switch weights under them.
            await asyncio.sleep(0.5)
            await DiskTransport(client).load_weights(str(second), old + 1)
            completions = await asyncio.gather(*tasks)
            under_second = [
                await client.score(p, c.output_ids)
                for p, c in zip(prompts, completions, strict=True)
            ]
            # Load the first weights again (as a new version) to score the old tokens.
            await DiskTransport(client).load_weights(str(first), old + 2)
            under_first = [
                await client.score(p, c.output_ids)
                for p, c in zip(prompts, completions, strict=True)
            ]
            return old, list(completions), under_second, under_first

    old, completions, under_second, under_first = run(go())
    split = [c for c in completions if c.n_segments == 2]
    assert split, "no completion was interrupted by the update"
    for prompt, completion, second_lp, first_lp in zip(
        prompts, completions, under_second, under_first, strict=True
    ):
        assert len(completion.output_ids) == length and completion.finish_reason == "length"
        assert completion.versions == versions_reported_for(prompt, completion, recorder.reports)
        assert set(completion.versions) <= {old, old + 1}
        assert completion.versions == sorted(completion.versions)
        for version, start, end in completion.segments:
            assert completion.versions[start:end] == [version] * (end - start)
        for i, version in enumerate(completion.versions):
            expected = first_lp[i] if version == old else second_lp[i]
            assert completion.logprobs[i] == pytest.approx(expected, abs=1e-3)
        if completion.n_segments == 1:
            assert completion.prefix_logprobs is None
            continue
        continued_at = completion.segments[1][1]
        assert completion.prefix_version == old + 1
        assert completion.prefix_logprobs == pytest.approx(second_lp[:continued_at], abs=1e-3)
    # The check discriminates: tokens sampled under the first weights do not fit the second.
    old_tokens = [
        abs(c.logprobs[i] - s[i])
        for c, s in zip(completions, under_second, strict=True)
        for i, v in enumerate(c.versions)
        if v == old
    ]
    assert sum(old_tokens) / len(old_tokens) > 1e-2
    assert any(c.n_requests >= 2 for c in split)


def test_reload_changes_logprobs_and_weight_info(
    vllm_fleet: ServerFleet, write_tiny_weights: Callable[..., Path]
) -> None:
    sequence = [*PROMPT, 9, 10, 11, 12, 13, 14]

    async def go() -> tuple[int, list[float], list[float]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            before = await client.prompt_logprobs(sequence, len(PROMPT))
            version = current_version(vllm_fleet) + 1
            timings = await DiskTransport(client).load_weights(str(write_tiny_weights(3)), version)
            assert timings["servers"] == 2 and timings["failed"] == 0
            after = await client.prompt_logprobs(sequence, len(PROMPT))
            return version, before, after

    version, before, after = run(go())
    assert len(before) == len(after) == 6
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-2
    for address in vllm_fleet.addresses:
        assert httpx.get(f"{address}/weight_info").json() == {"weight_version": str(version)}
    assert [s.version for s in vllm_fleet.pool.snapshot()] == [version, version]


def test_at_temperature_the_trainer_and_the_recompute_match_the_behaviour_logprobs(
    vllm_fleet: ServerFleet, write_tiny_weights: Callable[..., Path]
) -> None:
    """At T = 0.7 the servers report logprobs of softmax(z/T) (processed logprobs), the actor
    divides its logits by T and the recompute tempers vLLM's prompt logprobs: all three agree
    on the same weights; at T = 1 the trainer would not."""
    from sdp_cli.config.train_settings import TrainConfig
    from sdp_cli.trainer.actor import Actor

    temperature = 0.7
    weights = write_tiny_weights(21)

    async def go() -> tuple[list[Completion], list[list[float]]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            await DiskTransport(client).load_weights(str(weights), current_version(vllm_fleet) + 1)
            completions = await asyncio.gather(
                *(
                    client.generate(PROMPT, SamplingParams(temperature=temperature, seed=s), 24)
                    for s in range(4)
                )
            )
            pairs = [(PROMPT, c.output_ids) for c in completions]
            return list(completions), await client.score_many(pairs, temperature=temperature)

    completions, recomputed = run(go())
    outputs = [c.output_ids for c in completions]
    assert sum(len(o) for o in outputs) >= 20
    trainer = Actor(weights, TrainConfig(), temperature=temperature).score([PROMPT] * 4, outputs)
    plain = Actor(weights, TrainConfig()).score([PROMPT] * 4, outputs)
    behaviour = [lp for c in completions for lp in c.logprobs]
    flat = [lp for row in trainer for lp in row]
    assert max(abs(a - b) for a, b in zip(flat, behaviour, strict=True)) < 1e-3
    flat_recomputed = [lp for row in recomputed for lp in row]
    assert max(abs(a - b) for a, b in zip(flat_recomputed, behaviour, strict=True)) < 1e-3
    flat_plain = [lp for row in plain for lp in row]
    assert max(abs(a - b) for a, b in zip(flat_plain, behaviour, strict=True)) > 1e-2
