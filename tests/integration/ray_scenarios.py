"""Scenarios that start Ray, run by tests/integration/test_ray_backend.py inside a private network
namespace (`unshare -n`), where Ray binds to loopback only. Each prints one JSON object with
what it observed on its last line; the test asserts on it.

    python -m tests.integration.ray_scenarios fleet RUN_DIR MODEL_DIR WEIGHTS_DIR
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sdp_cli.config import load_config
from sdp_cli.inference import InferenceClient, SamplingParams, ServerPool
from sdp_cli.launcher.backends import make_fleet
from sdp_cli.launcher.guard import group_members, shared_memory_segments
from sdp_cli.launcher.ray_fleet import RayServerFleet
from sdp_cli.launcher.registry_file import read_registry
from sdp_cli.weight_sync.disk import DiskTransport
from tests.integration.server_kill import kill_while_serving

PROMPT = [1, 5, 6, 7]
# Names of the processes a Ray instance runs (its services and its workers).
RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker.py", "ray/_private")


def ray_or_vllm_processes(since: float) -> list[str]:
    """Command lines of Ray and vLLM processes started after `since` (there is no other in
    this namespace's test, but the machine is shared)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        try:
            if proc.info["create_time"] < since or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            line = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "vllm.entrypoints" in line or any(marker in line for marker in RAY_PROCESS_MARKERS):
            found.append(line[:200])
    return found


async def generate_on(address: str) -> list[int]:
    async with InferenceClient(ServerPool([address])) as client:
        completion = await client.generate(PROMPT, SamplingParams(seed=0, min_tokens=4), 4)
    return completion.output_ids


async def update_weights(fleet: RayServerFleet, weights_dir: Path, version: int) -> None:
    async with InferenceClient(fleet.pool) as client:
        await DiskTransport(client).load_weights(weights_dir, version)


def fleet_scenario(run_dir: Path, model_dir: Path, weights_dir: Path) -> dict[str, Any]:
    """Two servers on two logical nodes: where they run, a generation from each, a weight
    version staged on each node, server 0's vLLM killed while it generates (restarted by a new
    actor, loaded with the current weights from its own node-local copy, no request lost), and
    what is left after stop()."""
    import ray

    since = time.time() - 1
    cfg = load_config(
        overrides=[
            f"run.dir={run_dir}",
            f"model.path={model_dir}",
            "server.count=2",
            "server.backend=ray",
            "ray.address=local",
            "ray.local_nodes=2",
            "weights.transport=ray",
            f"ray.staging_dir={run_dir / 'staging'}",
            "server.health_interval_s=0.5",
        ]
    )
    fleet = make_fleet(cfg, model_dir, run_dir)
    assert isinstance(fleet, RayServerFleet)
    result: dict[str, Any] = {}
    segments: set[str] = set()
    started = time.monotonic()
    fleet.start()
    try:
        result["ready_s"] = time.monotonic() - started
        resources = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
        result["nodes"] = [fleet.node_of(i) for i in range(2)]
        result["node_resources"] = [resources.get(n or "", []) for n in result["nodes"]]
        result["outputs"] = [asyncio.run(generate_on(a)) for a in fleet.addresses]
        asyncio.run(update_weights(fleet, weights_dir, 1))
        result["versions"] = [server_version(a) for a in fleet.addresses]
        result["loaded_from"] = dict(fleet.loaded_from)
        result["staged"] = {
            i: sorted(p.name for p in Path(d).parent.iterdir())
            for i, d in fleet.loaded_from.items()
        }
        victim = fleet.process(0).pid
        # What both servers' vLLM processes share through /dev/shm (one machine here).
        for index in range(2):
            segments |= shared_memory_segments(group_members(fleet.process(index).pgid))
        completions = asyncio.run(generate_through_a_kill(fleet, victim))
        result["completions"] = [
            (len(c.output_ids), c.finish_reason, c.n_requests) for c in completions
        ]
        restarted_s = wait_until(
            lambda: fleet.pool.status(0).state == "ready" and fleet.pool.status(0).restarts == 1,
            300,
        )
        result["restart_s"] = restarted_s
        result["restarted"] = {
            "pid_changed": fleet.process(0).pid != victim,
            "victim_alive": psutil.pid_exists(victim)
            and psutil.Process(victim).status() != psutil.STATUS_ZOMBIE,
            "version": server_version(fleet.addresses[0]),
            "loaded_from": fleet.loaded_from[0],
            "node": fleet.node_of(0),
        }
        result["registry"] = [vars(e) for e in read_registry(fleet.registry_path)]
    finally:
        fleet.stop()
    time.sleep(1.0)
    result["staging_left"] = sorted(str(p) for p in (run_dir / "staging").glob("*"))
    result["shm_seen"] = len(segments)
    result["shm_left"] = sorted(path for path in segments if Path(path).exists())
    result["left_running"] = ray_or_vllm_processes(since)
    return result


async def generate_through_a_kill(fleet: RayServerFleet, victim: int) -> list[Any]:
    """32 completions of 64 tokens over both servers; server 0's vLLM is SIGKILLed while the
    client waits on some of them."""
    async with InferenceClient(fleet.pool) as client:
        return await kill_while_serving(
            fleet.pool,
            0,
            victim,
            lambda: asyncio.gather(
                *(
                    client.generate(PROMPT, SamplingParams(seed=i, min_tokens=64), 64)
                    for i in range(32)
                )
            ),
        )


def wait_until(condition: Callable[[], bool], timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(0.25)
    return time.monotonic() - start


def server_version(address: str) -> str:
    import httpx

    return str(httpx.get(f"{address}/weight_info", timeout=10).json()["weight_version"])


def main(argv: list[str]) -> None:
    name, *args = argv
    if name == "fleet":
        result = fleet_scenario(Path(args[0]), Path(args[1]), Path(args[2]))
    elif name == "leftovers":
        result = {"left_running": ray_or_vllm_processes(float(args[0]))}
    else:
        raise SystemExit(f"unknown scenario {name}")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
