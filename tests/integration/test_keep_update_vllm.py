"""Weight updates that keep requests running (train.update_mode=keep) against real vLLM CPU
servers (the session's `vllm_fleet`, two servers with the tiny model): versions and logprobs
around the update, and what vLLM does with requests that arrive while it is paused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from sdp_cli.inference import Completion, InferenceClient, SamplingParams
from sdp_cli.inference.protocol import (
    COMPLETIONS_PATH,
    GENERATE_PATH,
    SERVED_MODEL_NAME,
    generate_body,
    parse_generate_answer,
    prompt_logprobs_body,
)
from sdp_cli.launcher import ServerFleet
from sdp_cli.weight_sync.disk import DiskTransport
from sdp_cli.weight_sync.vllm_http import pause_server_keep, resume_server

pytestmark = pytest.mark.vllm

T = TypeVar("T")
LENGTH = 200


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def current_version(fleet: ServerFleet) -> int:
    return fleet.pool.target().version


def head_only_weights(base: Path, target: Path) -> Path:
    """`base` with only the final norm changed: the logits move, the KV cache does not, so a
    token sampled after a keep update is exactly what the new weights give over the same
    context (a change of every layer would sample over a KV cache of the old weights)."""
    import torch
    from transformers import LlamaForCausalLM

    if target.is_dir():
        return target
    model = LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm = model.model.norm.weight
        norm.mul_(2.0).add_(torch.randn(norm.shape, generator=generator))
    model.save_pretrained(target, safe_serialization=True)
    return target


def test_a_keep_update_splits_requests_in_place_with_the_new_weights_logprobs(
    vllm_fleet: ServerFleet,
    write_tiny_weights: Callable[..., Path],
    tmp_path: Path,
) -> None:
    first = write_tiny_weights(1)
    second = head_only_weights(first, tmp_path / "head-only")
    prompts = [[1, 5 + i, 6, 7] for i in range(8)]

    Scores = list[list[float]]

    async def go() -> tuple[int, list[Completion], dict[str, float], Scores, Scores]:
        async with InferenceClient(vllm_fleet.pool) as client:
            old = current_version(vllm_fleet) + 1
            await DiskTransport(client).load_weights(str(first), old)
            tasks = [
                asyncio.create_task(
                    client.generate(p, SamplingParams(seed=i, ignore_eos=True), LENGTH)
                )
                for i, p in enumerate(prompts)
            ]
            await asyncio.sleep(0.3)
            timings = await DiskTransport(client, keep_requests=True).load_weights(
                str(second), old + 1
            )
            completions = list(await asyncio.gather(*tasks))
            under_second = [
                await client.score(p, c.output_ids)
                for p, c in zip(prompts, completions, strict=True)
            ]
            await DiskTransport(client).load_weights(str(first), old + 2)
            under_first = [
                await client.score(p, c.output_ids)
                for p, c in zip(prompts, completions, strict=True)
            ]
            return old, completions, timings, under_second, under_first

    old, completions, timings, under_second, under_first = run(go())
    assert timings["servers"] == 2 and timings["failed"] == 0
    split = [c for c in completions if set(c.versions) == {old, old + 1}]
    assert split, "no completion was generating during the keep update"
    for completion, second_lp, first_lp in zip(completions, under_second, under_first, strict=True):
        # Nothing aborted or resubmitted: one request each, to its full length.
        assert completion.n_requests == 1
        assert completion.finish_reason == "length" and len(completion.output_ids) == LENGTH
        assert completion.versions == sorted(completion.versions)
        assert set(completion.versions) <= {old, old + 1}
        for i, version in enumerate(completion.versions):
            expected = first_lp[i] if version == old else second_lp[i]
            assert completion.logprobs[i] == pytest.approx(expected, abs=1e-3)
    # The check discriminates: the two weights give different logprobs on the same tokens.
    gaps = [
        abs(a - b)
        for f, s in zip(under_first, under_second, strict=True)
        for a, b in zip(f, s, strict=True)
    ]
    assert sum(gaps) / len(gaps) > 1e-2


def test_a_keep_update_of_every_layer_samples_over_the_old_kv_cache(
    vllm_fleet: ServerFleet, write_tiny_weights: Callable[..., Path]
) -> None:
    """With every layer changed, the tokens after the resume come from the new weights over
    the KV cache the old ones computed: their logprobs are what sampled them (exact for the
    decoupled loss), yet not what a fresh prefill under the new weights gives."""
    first, second = write_tiny_weights(1), write_tiny_weights(2)
    # Several completions, so that some are still generating when the update comes however
    # fast the machine is at the moment.
    prompts = [[1, 9 + i, 6, 7] for i in range(8)]

    async def go() -> tuple[int, list[Completion], list[list[float]]]:
        async with InferenceClient(vllm_fleet.pool) as client:
            old = current_version(vllm_fleet) + 1
            await DiskTransport(client).load_weights(str(first), old)
            tasks = [
                asyncio.create_task(
                    client.generate(p, SamplingParams(seed=3 + i, ignore_eos=True), LENGTH)
                )
                for i, p in enumerate(prompts)
            ]
            await asyncio.sleep(0.2)
            await DiskTransport(client, keep_requests=True).load_weights(str(second), old + 1)
            completions = list(await asyncio.gather(*tasks))
            fresh = [
                await client.score(p, c.output_ids)
                for p, c in zip(prompts, completions, strict=True)
            ]
            return old, completions, fresh

    old, completions, fresh = run(go())
    assert all(c.n_requests == 1 for c in completions)
    split = [
        (c, f) for c, f in zip(completions, fresh, strict=True) if set(c.versions) == {old, old + 1}
    ]
    assert split, "no completion was generating during the keep update"
    gaps = [
        abs(c.logprobs[i] - f[i])
        for c, f in split
        for i, v in enumerate(c.versions)
        if v == old + 1
    ]
    assert sum(gaps) / len(gaps) > 1e-3


def test_requests_arriving_during_a_keep_pause_wait_for_the_resume(
    vllm_fleet: ServerFleet,
) -> None:
    """vLLM 0.32 neither refuses nor aborts a request sent to a server paused with keep: a
    generation and a scoring request both wait in its queue and are answered after the
    resume, the generation in full under the version set before the resume."""
    server = vllm_fleet.pool.snapshot()[0]
    address = server.address
    version = current_version(vllm_fleet)

    async def go() -> tuple[float, float, dict[str, Any], dict[str, Any], bool]:
        async with httpx.AsyncClient() as http:
            await pause_server_keep(http, address, 30.0)
            paused_at = time.monotonic()
            try:
                sampling = SamplingParams(seed=1, ignore_eos=True).request_fields(16, 0)
                generation = asyncio.create_task(
                    http.post(
                        f"{address}{GENERATE_PATH}",
                        json=generate_body("keep-pause-test", [1, 5, 6, 7], sampling),
                        timeout=60.0,
                    )
                )
                scoring = asyncio.create_task(
                    http.post(
                        f"{address}{COMPLETIONS_PATH}",
                        json=prompt_logprobs_body([[1, 5, 6, 7, 8]], SERVED_MODEL_NAME),
                        timeout=60.0,
                    )
                )
                await asyncio.sleep(1.5)
                waiting = not generation.done() and not scoring.done()
            finally:
                resumed_at = time.monotonic()
                await resume_server(http, address, 30.0)
            generated, scored = await generation, await scoring
            generated.raise_for_status()
            scored.raise_for_status()
            return paused_at, resumed_at, generated.json(), scored.json(), waiting

    paused_at, resumed_at, generated, scored, waiting = run(go())
    assert resumed_at - paused_at >= 1.5
    assert waiting, "a request sent to a paused server was answered before the resume"
    answer = parse_generate_answer(generated)
    assert answer.finish_reason == "length" and len(answer.token_ids) == 16
    assert answer.versions == [version] * 16
    assert scored["choices"][0]["prompt_logprobs"][1] is not None
