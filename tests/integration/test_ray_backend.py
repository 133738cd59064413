"""`server.backend=ray` with real vLLM CPU servers on two logical Ray nodes.

Ray binds to the machine's external interface unless it runs in a network namespace of its own,
so every command here that starts Ray runs under `unshare -n` with only loopback up
(tests/integration/ray_scenarios.py holds the library-level scenario). Process ids are shared
with the namespace, so the test kills and inspects processes from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    Event,
    ServerStateEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)
from tests import REPO

pytestmark = pytest.mark.vllm
E = TypeVar("E", bound=Event)

SMALL = [
    "rollout.batch_size=4",
    "rollout.n_samples=2",
    "rollout.max_new_tokens=8",
    "rollout.max_concurrent=16",
]
TWO_NODES = [
    "server.backend=ray",
    "ray.address=local",
    "ray.local_nodes=2",
    "server.count=2",
    "weights.transport=ray",
]


def in_private_network(argv: list[str]) -> list[str]:
    """`argv` in a new network namespace with only loopback up: nothing Ray binds is reachable
    from, or talks to, the machine's network."""
    return ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$@"', "netns", *argv]


def sdp(*args: str) -> list[str]:
    return in_private_network([sys.executable, "-m", "sdp_cli", *args])


def left_running(since: float) -> list[str]:
    from tests.integration.ray_scenarios import ray_or_vllm_processes

    time.sleep(1.0)
    return ray_or_vllm_processes(since)


def events_of(run_dir: Path, kind: type[E]) -> list[E]:
    return [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, kind)]


def test_two_servers_on_two_nodes_generate_load_staged_weights_and_survive_a_kill(
    tmp_path: Path, tiny_model_dir: Path, write_tiny_weights: Callable[..., Path]
) -> None:
    weights = write_tiny_weights(11)
    run_dir = tmp_path / "run"
    # As a module from the root, so that it imports tests.integration.server_kill.
    command = [sys.executable, "-m", "tests.integration.ray_scenarios", "fleet", str(run_dir)]
    done = subprocess.run(
        in_private_network([*command, str(tiny_model_dir), str(weights)]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"ready in {result['ready_s']:.0f} s, restarted in {result['restart_s']:.0f} s")

    # Placed by the placement group on the two logical nodes, one each.
    nodes = result["nodes"]
    assert len(set(nodes)) == 2 and None not in nodes
    assert {
        r for resources in result["node_resources"] for r in resources if r in {"node0", "node1"}
    } == {"node0", "node1"}
    assert [entry["node"] for entry in result["registry"]] == [
        result["restarted"]["node"],
        nodes[1],
    ]
    # Each served a generation.
    assert [len(out) for out in result["outputs"]] == [4, 4]

    # Version 1 came from each server's own node-local copy, not the exported directory.
    loaded = result["loaded_from"]
    assert result["versions"] == ["1", "1"]
    assert loaded["0"] != loaded["1"]
    for index, node in enumerate(nodes):
        path = Path(loaded[str(index)])
        assert path.name == "v1" and path.is_relative_to(run_dir / "staging")
        assert f"server-{index}-{node[:12]}" in path.parent.name
        assert result["staged"][str(index)] == ["model", "v1"]

    # The killed server: every request finished (resubmitted elsewhere), a new actor restarted
    # it and loaded version 1 from its own fresh node-local copy before it served again.
    completions = result["completions"]
    assert len(completions) == 32
    assert all(length == 64 and reason == "length" for length, reason, _ in completions)
    assert any(requests >= 2 for _, _, requests in completions), "nothing was resubmitted"
    restarted = result["restarted"]
    assert restarted["pid_changed"] and not restarted["victim_alive"]
    assert restarted["version"] == "1"
    assert restarted["loaded_from"] != loaded["0"]
    assert Path(restarted["loaded_from"]).is_relative_to(run_dir / "staging")
    assert result["registry"][0]["restarts"] == 1

    # stop(): no actor, vLLM process or Ray service left, every node-local copy deleted, and
    # no shared-memory segment of either server (the killed one's included) left in /dev/shm.
    assert result["left_running"] == []
    assert result["staging_left"] == []
    assert result["shm_seen"] > 0
    assert result["shm_left"] == []


def test_sdp_train_on_ray_stages_weights_per_node_within_the_bound(tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    staging = tmp_path / "staging"
    since = time.time()
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    stop = threading.Event()

    def watch_registry() -> None:
        # The node-local directory each server loads from, as the registry shows it.
        while not stop.is_set():
            try:
                servers = json.loads((run_dir / "servers.json").read_text())["servers"]
            except (OSError, ValueError, KeyError):
                servers = []
            for index, entry in enumerate(servers[:2]):
                if entry.get("weights_dir"):
                    seen[index].add(entry["weights_dir"])
            stop.wait(0.1)

    watcher = threading.Thread(target=watch_registry, daemon=True)
    watcher.start()
    try:
        done = subprocess.run(
            sdp(
                "train",
                *TWO_NODES,
                *SMALL,
                "train.steps=3",
                f"run.dir={run_dir}",
                f"ray.staging_dir={staging}",
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    registry = json.loads((run_dir / "servers.json").read_text())["servers"]
    nodes = [entry["node"] for entry in registry]
    assert len(set(nodes)) == 2
    # Each server loaded every version from its own copy on its node: no path is shared.
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    for index, paths in seen.items():
        for path in paths:
            assert Path(path).is_relative_to(staging)
            assert f"server-{index}-{nodes[index][:12]}" in path
    assert {Path(p).name for p in seen[0] | seen[1]} <= {"v1", "v2", "v3"}
    assert [u.version for u in events_of(run_dir, WeightUpdateEvent)] == [1, 2, 3]
    assert {e.node for e in events_of(run_dir, ServerStateEvent)} >= set(nodes)
    for batch in events_of(run_dir, BatchTakenEvent):
        assert all(0 <= lag <= 2 for lag in batch.head_lags + batch.tail_lags)
    assert len(events_of(run_dir, TrainStepEvent)) == 3
    # Old versions and the model copies were deleted on every node; nothing keeps running.
    assert list(staging.glob("*")) == []
    assert left_running(since) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_sdp_train_on_ray_leaves_no_actor_server_or_ray_instance(
    tmp_path: Path, signum: int
) -> None:
    run_dir = tmp_path / "stopped"
    since = time.time()
    proc = subprocess.Popen(
        sdp("train", *TWO_NODES, *SMALL, "train.steps=50", f"run.dir={run_dir}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        # Stop it while both actors' vLLM servers are starting: the Ray instance, two actors
        # and two vLLM process groups are all up then.
        while True:
            assert proc.poll() is None, "sdp train exited on its own"
            assert time.monotonic() < deadline, "the servers were never spawned"
            try:
                servers = json.loads((run_dir / "servers.json").read_text())["servers"]
            except (OSError, ValueError, KeyError):
                servers = []
            if len(servers) == 2 and all(s["pid"] for s in servers):
                break
            time.sleep(0.2)
        time.sleep(2.0)
        assert left_running(since), "nothing of Ray or vLLM was running before the signal"
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
    assert left_running(since) == []
