"""The launcher with real vLLM CPU servers: a server killed mid-run is restarted and synced
without losing a request; Ctrl-C of `sdp launch-servers` leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import ServerStateEvent
from sdp_cli.inference import Completion, InferenceClient, SamplingParams, ServerPool, ServerState
from sdp_cli.launcher import ServerFleet, read_registry
from sdp_cli.launcher.process import group_alive
from sdp_cli.weight_sync.disk import DiskTransport
from tests.integration.server_kill import kill_while_serving

pytestmark = pytest.mark.vllm

PROMPT = [1, 5, 6, 7]
REFERENCE = [*PROMPT, 9, 10, 11, 12, 13, 14, 15, 16]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


async def score_on(address: str) -> list[float]:
    """Logprobs of the reference sequence on one particular server."""
    async with InferenceClient(ServerPool([address])) as client:
        return await client.prompt_logprobs(REFERENCE, len(PROMPT))


def test_killed_server_is_restarted_and_synced_and_no_request_is_lost(
    vllm_fleet: ServerFleet, write_tiny_weights: Callable[..., Path]
) -> None:
    version = vllm_fleet.pool.target().version + 1
    length = 240
    requests = 32

    async def load_weights() -> None:
        async with InferenceClient(vllm_fleet.pool) as client:
            await DiskTransport(client).load_weights(str(write_tiny_weights(4)), version)

    asyncio.run(load_weights())
    expected = asyncio.run(score_on(vllm_fleet.addresses[1]))
    victim = vllm_fleet.process(0)

    async def generate_through_a_crash() -> list[Completion]:
        async with InferenceClient(vllm_fleet.pool) as client:
            return await kill_while_serving(
                vllm_fleet.pool,
                0,
                victim.pid,
                lambda: asyncio.gather(
                    *(
                        client.generate(PROMPT, SamplingParams(seed=i, min_tokens=length), length)
                        for i in range(requests)
                    )
                ),
            )

    completions = asyncio.run(generate_through_a_crash())
    assert len(completions) == requests
    for completion in completions:
        assert len(completion.output_ids) == length and completion.finish_reason == "length"
        assert completion.versions == [version] * length
    assert any(c.n_requests >= 2 for c in completions), "no request was resubmitted"

    wait_for(
        lambda: (
            vllm_fleet.pool.status(0).state == ServerState.ready
            and vllm_fleet.pool.status(0).restarts == 1
        ),
        timeout_s=300,
        what="server 0 to be restarted",
    )
    restarted = vllm_fleet.process(0)
    assert restarted.pid != victim.pid
    assert not group_alive(victim.pgid), "the killed server's engine processes were left behind"
    address = vllm_fleet.addresses[0]
    assert httpx.get(f"{address}/weight_info").json() == {"weight_version": str(version)}
    # Synced to the current weights, not the model directory's initial ones.
    assert asyncio.run(score_on(address)) == pytest.approx(expected, abs=1e-4)

    entry = read_registry(vllm_fleet.registry_path)[0]
    assert (entry.pid, entry.restarts, entry.state, entry.version) == (
        restarted.pid,
        1,
        "ready",
        version,
    )
    events = list(read_events(vllm_fleet.run_dir / "events.jsonl"))
    assert any(isinstance(e, ServerStateEvent) and e.state == "restarting" for e in events)


def test_ctrl_c_of_launch_servers_leaves_no_process_behind(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "servers.json"
    output = (tmp_path / "output.txt").open("w")
    command = [
        sys.executable,
        "-m",
        "sdp_cli",
        "launch-servers",
        f"run.dir={tmp_path / 'run'}",
        f"model.path={tiny_model_dir}",
        f"server.registry={registry}",
        "server.count=1",
    ]
    proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "output.txt").read_text()
            if not registry.exists():
                return False
            servers = json.loads(registry.read_text())["servers"]
            return bool(servers) and all(s["state"] == "ready" for s in servers)

        wait_for(ready, timeout_s=300, what="the server to be ready")
        entry = read_registry(registry)[0]
        assert httpx.get(f"{entry.address}/health").status_code == 200
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert entry.pid in {p.pid for p in descendants}
        assert len(descendants) >= 3  # the API server, its engine core and worker

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        output.close()
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left behind: {alive}"
    assert not group_alive(entry.pgid)
    assert read_registry(registry)[0].state == "dead"
