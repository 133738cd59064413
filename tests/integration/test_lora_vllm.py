"""LoRA on a real vLLM CPU server with the tiny model (train.lora.rank > 0): the server loads
each version's adapter and serves it to the requests that name it, its logprobs under the
adapter equal the trainer's, old adapters are unloaded, a killed server comes back as the base
model plus the current adapter, and `sdp export --merge` writes a model vLLM loads.

One LoRA-enabled server for the module (the session's `vllm_fleet` runs without LoRA)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from sdp_cli.config import config_to_yaml, load_config
from sdp_cli.config.train_settings import LoraConfig, TrainConfig
from sdp_cli.events.event_log import EventLog
from sdp_cli.inference import Completion, InferenceClient, SamplingParams, ServerState
from sdp_cli.inference.adapters import adapter_name
from sdp_cli.launcher import ServerFleet
from sdp_cli.launcher.command import with_lora_serving
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.trainer.actor import Actor
from sdp_cli.weight_sync.disk import DiskTransport
from tests.unit.trainer.test_checkpoint import PROMPT, train_once

pytestmark = pytest.mark.vllm

OUTPUT = [7, 8, 2]
# float32 on both sides; vLLM's kernels add up in another order than torch's.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lora_fleet(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFleet]:
    cfg = load_config(overrides=["server.count=1", "server.health_interval_s=1.0"])
    server = with_lora_serving(cfg.server, LoraConfig(rank=8), tiny_model_dir)
    run_dir = tmp_path_factory.mktemp("lora-run")
    events = EventLog(run_dir / "events.jsonl")
    fleet = ServerFleet(server, tiny_model_dir, run_dir, events=events)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()
        events.close()


@pytest.fixture(scope="module")
def actor(tiny_model_dir: Path) -> Actor:
    config = replace(TrainConfig(), lr=1e-2, lora=LoraConfig(rank=8), keep_weights=2)
    return Actor(tiny_model_dir, config, seed=0)


def load(fleet: ServerFleet, path: Path, version: int) -> dict[str, float]:
    async def go() -> dict[str, float]:
        async with InferenceClient(fleet.pool) as client:
            return await DiskTransport(client).load_weights(str(path), version)

    return asyncio.run(go())


def served_logprobs(fleet: ServerFleet) -> list[float]:
    async def go() -> list[float]:
        async with InferenceClient(fleet.pool) as client:
            (scores,) = await client.score_many([(PROMPT, OUTPUT)])
            return scores

    return asyncio.run(go())


def served_adapters(fleet: ServerFleet) -> set[str]:
    models = httpx.get(f"{fleet.addresses[0]}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_the_server_serves_each_versions_adapter_with_the_trainers_logprobs(
    lora_fleet: ServerFleet, actor: Actor, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    prefix = lora_fleet.pool.adapter_prefix
    base = served_logprobs(lora_fleet)
    for version in (1, 2):
        train_once(actor, version - 1)
        started = time.perf_counter()
        timings = load(lora_fleet, actor.export_weights(weights, version), version)
        assert timings["failed"] == 0 and time.perf_counter() - started < 30
        name = adapter_name(prefix, version)
        assert lora_fleet.pool.status(0).adapter == name
        # The old version's adapter is gone once no request names it.
        assert served_adapters(lora_fleet) == {name}
        expected = actor.score([PROMPT], [OUTPUT])[0]
        assert served_logprobs(lora_fleet) == pytest.approx(expected, abs=TOLERANCE)
    assert base != pytest.approx(expected, abs=1e-2), "the adapter changed nothing"

    async def generate() -> list[int]:
        async with InferenceClient(lora_fleet.pool) as client:
            completion = await client.generate(PROMPT, SamplingParams(seed=1, min_tokens=8), 8)
            return completion.versions

    assert asyncio.run(generate()) == [2] * 8


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_a_killed_server_comes_back_as_the_base_model_plus_the_current_adapter(
    lora_fleet: ServerFleet, actor: Actor
) -> None:
    version = lora_fleet.pool.target().version
    assert version >= 1, "runs after the test that loads adapters"
    victim = lora_fleet.process(0)
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(
        lambda: (
            lora_fleet.pool.status(0).state == ServerState.ready
            and lora_fleet.pool.status(0).restarts == 1
        ),
        timeout_s=400,
        what="server 0 to be restarted",
    )
    name = adapter_name(lora_fleet.pool.adapter_prefix, version)
    assert lora_fleet.pool.status(0).adapter == name
    assert served_adapters(lora_fleet) == {name}
    expected = actor.score([PROMPT], [OUTPUT])[0]
    assert served_logprobs(lora_fleet) == pytest.approx(expected, abs=TOLERANCE)


def test_sdp_export_merge_writes_a_model_vllm_loads(
    lora_fleet: ServerFleet, actor: Actor, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from sdp_cli.commands.export_run import export_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(overrides=[f"run.dir={run_dir}", f"model.path={tiny_model_dir}"])
    cfg = replace(cfg, train=replace(cfg.train, lora=LoraConfig(rank=8)))
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    actor.save_checkpoint(run_dir, TrainState(step=2, version=2, data_position=8), None)
    merged = tmp_path / "merged"
    export_run(run_dir, merged, merge=True)
    # vLLM's loader reads the merged directory as full weights (requests then name no adapter).
    version = lora_fleet.pool.target().version + 1
    assert load(lora_fleet, merged, version)["failed"] == 0
    assert lora_fleet.pool.status(0).adapter is None
    expected = actor.score([PROMPT], [OUTPUT])[0]
    assert served_logprobs(lora_fleet) == pytest.approx(expected, abs=TOLERANCE)


def test_a_keep_update_lets_requests_in_flight_finish_on_the_adapter_they_named(
    lora_fleet: ServerFleet, actor: Actor, tmp_path: Path
) -> None:
    """train.update_mode=keep with LoRA: the requests running at the update are frozen and
    resumed, not aborted; they finish on their adapter, and every token carries its version and
    its logprob; the old adapter stays loaded while they run; new requests get the new one."""
    weights = tmp_path / "weights"
    old = lora_fleet.pool.target().version + 1
    train_once(actor, old - 1)
    old_dir = actor.export_weights(weights, old)
    train_once(actor, old)
    new_dir = actor.export_weights(weights, old + 1)
    prefix = lora_fleet.pool.adapter_prefix
    # As many and as long as the full-weight keep test's, so that some are still running.
    prompts = [[1, 5 + i, 6, 7] for i in range(8)]
    length = 200

    Outcome = tuple[list[Completion], dict[str, float], set[str], list[bool], list[int]]

    async def go() -> Outcome:
        async with InferenceClient(lora_fleet.pool) as client:
            await DiskTransport(client).load_weights(str(old_dir), old)
            tasks = [
                asyncio.create_task(
                    client.generate(p, SamplingParams(seed=i, ignore_eos=True), length)
                )
                for i, p in enumerate(prompts)
            ]
            # Every request on the server under the old adapter before the update comes.
            deadline = time.monotonic() + 60
            while lora_fleet.pool.status(0).in_flight < len(prompts):
                assert time.monotonic() < deadline, "the requests never reached the server"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            timings = await DiskTransport(client, keep_requests=True).load_weights(
                str(new_dir), old + 1
            )
            during = served_adapters(lora_fleet)
            running = [not task.done() for task in tasks]
            completions = list(await asyncio.gather(*tasks))
            after = await client.generate(PROMPT, SamplingParams(seed=1, min_tokens=8), 8)
            return completions, timings, during, running, after.versions

    completions, timings, during, running, after = asyncio.run(go())
    assert timings["failed"] == 0
    assert any(running), "every request had finished before the keep update"
    # The old adapter stays loaded while requests name it.
    assert adapter_name(prefix, old) in during
    assert adapter_name(prefix, old + 1) in during
    assert after == [old + 1] * 8
    # Nothing aborted or resubmitted: one request each, to its full length, on the old adapter.
    for completion in completions:
        assert completion.n_requests == 1
        assert completion.finish_reason == "length" and len(completion.output_ids) == length
        assert completion.versions == [old] * length
    # Their logprobs are the old adapter's: load it again as a later version and score them.
    load(lora_fleet, old_dir, old + 2)

    async def rescore() -> list[list[float]]:
        async with InferenceClient(lora_fleet.pool) as client:
            return await client.score_many(
                [(p, c.output_ids) for p, c in zip(prompts, completions, strict=True)]
            )

    for completion, expected in zip(completions, asyncio.run(rescore()), strict=True):
        assert completion.logprobs == pytest.approx(expected, abs=1e-3)
