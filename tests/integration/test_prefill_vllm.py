"""Seeded sampling on a CPU server whose prefills would be chunked (real vLLM, tiny model).

vLLM rewinds the generator of a seeded request after a partial prefill, which a CPU generator
cannot do: the engine dies. The segment-wise protocol makes many long prefills at once (every
completion aborted by a weight update is prefilled again with its tokens so far), so sdp
launches CPU servers whose scheduler never splits a prefill (launcher/command.py
`cpu_scheduler_args`). The same burst of long seeded prompts kills a server that chunks and is
served whole by one launched as sdp launches it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sdp_cli.config import load_config
from sdp_cli.inference import Completion, InferenceClient, SamplingParams
from sdp_cli.inference.client_errors import InferenceError
from sdp_cli.launcher import ServerFleet
from sdp_cli.launcher.command import CPU_DEFAULT_BATCHED_TOKENS

pytestmark = pytest.mark.vllm

# More prompt tokens at once than one engine step's budget on each of the shared fleet's two
# servers, so a chunking scheduler must split some of them; each prompt plus its completion
# fits the tiny model's 256 positions.
PROMPT_LEN = 200
N_PROMPTS = 2 * (CPU_DEFAULT_BATCHED_TOKENS // PROMPT_LEN + 3)
NEW_TOKENS = 16
CRASH = "CPU Generator does not use offset"


def long_prompts() -> list[list[int]]:
    return [[1] + [4 + (i + j) % 50 for j in range(PROMPT_LEN - 1)] for i in range(N_PROMPTS)]


async def burst(client: InferenceClient) -> list[Completion | BaseException]:
    """Every long prompt at once, each with its own seed (as sdp samples)."""
    return await asyncio.gather(
        *(
            client.generate(prompt, SamplingParams(seed=i, ignore_eos=True), NEW_TOKENS)
            for i, prompt in enumerate(long_prompts())
        ),
        return_exceptions=True,
    )


def test_a_chunking_cpu_server_dies_on_a_burst_of_long_seeded_prompts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The crash users hit, reproduced: the same server with chunked prefill switched back on
    (the flag comes after sdp's own, so it wins)."""
    cfg = load_config(
        overrides=["server.max_restarts=0", "server.extra_args=[--enable-chunked-prefill]"]
    )
    fleet = ServerFleet(cfg.server, tiny_model_dir, tmp_path, restart_backoff_s=0.1)
    fleet.start()
    try:

        async def go() -> list[Completion | BaseException]:
            async with InferenceClient(fleet.pool, max_attempts=1, server_wait_s=5.0) as client:
                return await burst(client)

        answers = asyncio.run(go())
    finally:
        fleet.stop()
    assert any(isinstance(answer, InferenceError) for answer in answers)
    assert CRASH in (tmp_path / "logs" / "server-0.log").read_text()


def test_a_server_launched_by_sdp_serves_the_same_burst_whole_and_seeds_still_replay(
    vllm_fleet: ServerFleet,
) -> None:
    restarts = [status.restarts for status in vllm_fleet.pool.snapshot()]

    async def go() -> tuple[list[Completion | BaseException], list[Completion | BaseException]]:
        async with InferenceClient(vllm_fleet.pool, max_attempts=1) as client:
            return await burst(client), await burst(client)

    answers, again = asyncio.run(go())
    for answer, replayed in zip(answers, again, strict=True):
        assert isinstance(answer, Completion), answer
        assert isinstance(replayed, Completion), replayed
        assert len(answer.output_ids) == NEW_TOKENS and answer.n_requests == 1
        assert replayed.output_ids == answer.output_ids
    assert [status.restarts for status in vllm_fleet.pool.snapshot()] == restarts
    for index in range(len(vllm_fleet.pool)):
        log = Path(vllm_fleet.process(index).spec.log_path).read_text()
        assert CRASH not in log
