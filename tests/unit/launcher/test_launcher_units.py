"""Launcher pieces that need no server: device and core split, command line and environment,
ports, registry file, failure explanations."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sdp_cli.config import load_config
from sdp_cli.config.server_settings import Device
from sdp_cli.launcher import (
    DeviceAllocationError,
    RegistryEntry,
    RegistryError,
    attach_servers,
    read_registry,
    split_devices,
    visible_cuda_devices,
    write_registry,
)
from sdp_cli.launcher.command import vllm_command, vllm_env
from sdp_cli.launcher.devices import split_cpu_cores
from sdp_cli.launcher.fleet import requests_on_server
from sdp_cli.launcher.process import LaunchSpec, LocalProcessBackend, free_port
from sdp_cli.launcher.server import explain_failure, launch_spec, log_tail, startup_failure


def test_devices_are_split_into_disjoint_groups_per_server() -> None:
    devices = ["0", "1", "2", "3", "4"]
    assert split_devices(2, 2, devices) == [["0", "1"], ["2", "3"]]
    assert split_devices(3, 1, devices) == [["0"], ["1"], ["2"]]


def test_too_few_devices_is_a_clear_error() -> None:
    with pytest.raises(DeviceAllocationError) as info:
        split_devices(2, 2, ["0", "1", "2"])
    message = str(info.value)
    assert "needs 4 CUDA devices, but 3 are visible (0,1,2)" in message
    assert "server.count" in message and "server.tensor_parallel_size" in message


def test_visible_devices_follow_the_parents_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,GPU-abc")
    assert visible_cuda_devices() == ["3", "5", "GPU-abc"]


def test_gpu_servers_get_their_devices_and_tensor_parallel_size(tmp_path: Path) -> None:
    cfg = load_config(overrides=["server=gpu", "server.tensor_parallel_size=2"])
    assert cfg.server.device == Device.cuda
    command = vllm_command(cfg.server, tmp_path, 8001)
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    env = vllm_env(cfg.server, ["2", "3"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_cpu_server_command_and_environment(tmp_path: Path) -> None:
    cfg = load_config(overrides=["server.max_model_len=128", "server.seed=4"])
    command = vllm_command(cfg.server, tmp_path, 8002)
    for flag, value in (
        ("--dtype", "float32"),
        ("--max-model-len", "128"),
        ("--seed", "4"),
        ("--port", "8002"),
        ("--generation-config", "vllm"),
    ):
        assert command[command.index(flag) + 1] == value
    assert "--enable-scale-out" in command
    env = vllm_env(cfg.server)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_cores_are_split_between_the_servers_and_the_trainer() -> None:
    assert split_cpu_cores([1, 0]) == ([0], [1])
    assert split_cpu_cores([5, 2, 3, 4]) == ([2, 3, 4], [5])
    assert split_cpu_cores([0]) is None


def test_cpu_cores_reach_vllm_binding_and_the_launch_spec(tmp_path: Path) -> None:
    cfg = load_config(overrides=["server.cpu_cores=[0]"])
    assert vllm_env(cfg.server)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert launch_spec(cfg.server, tmp_path, 0, tmp_path, port=8003).cpu_cores == [0]
    # Without cores vLLM keeps its own automatic binding.
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(load_config().server)


def test_a_launched_process_runs_on_its_cores_and_so_do_its_children(tmp_path: Path) -> None:
    core = min(os.sched_getaffinity(0))
    script = (
        "import os, subprocess, sys; "
        "child = subprocess.run([sys.executable, '-c', "
        "'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True); "
        "print(sorted(os.sched_getaffinity(0)), child.stdout.strip())"
    )
    spec = LaunchSpec(
        index=0,
        command=[sys.executable, "-c", script],
        env=dict(os.environ),
        log_path=tmp_path / "out.log",
        port=0,
        cpu_cores=[core],
    )
    proc = LocalProcessBackend().start(spec)
    assert proc.popen is not None
    assert proc.popen.wait(timeout=30) == 0
    assert (tmp_path / "out.log").read_text().split() == [f"[{core}]", f"[{core}]"]


def test_free_port_never_returns_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        port = free_port("127.0.0.1", start=taken)
        assert port != taken
        assert free_port("127.0.0.1", start=port, taken={port}) not in (port, taken)


def entry(address: str, state: str = "ready") -> RegistryEntry:
    return RegistryEntry(
        address=address,
        pid=10,
        pgid=10,
        model="/m",
        version=2,
        state=state,
        restarts=1,
        started_at=1.5,
    )


def test_registry_round_trips_and_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "servers.json"
    write_registry(path, [entry("http://127.0.0.1:1")])
    write_registry(path, [entry("http://127.0.0.1:1"), entry("http://127.0.0.1:2", "dead")])
    assert read_registry(path) == [entry("http://127.0.0.1:1"), entry("http://127.0.0.1:2", "dead")]
    data = json.loads(path.read_text())
    assert set(data["servers"][0]) == {
        "address",
        "pid",
        "pgid",
        "model",
        "version",
        "state",
        "restarts",
        "started_at",
    }
    # No temporary file is left next to it.
    assert [p.name for p in path.parent.iterdir()] == ["servers.json"]


def test_a_missing_or_malformed_registry_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        read_registry(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"servers": [{"address": "x"}]}')
    with pytest.raises(RegistryError, match="malformed"):
        read_registry(bad)


def test_attach_returns_live_healthy_servers_only(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    write_registry(
        path,
        [entry("http://a:1"), entry("http://b:2"), entry("http://c:3", "dead")],
    )

    def health(request: httpx.Request) -> httpx.Response:
        if request.url.host == "b":
            raise httpx.ConnectError("refused")
        return httpx.Response(200)

    transport = httpx.MockTransport(health)
    assert attach_servers(path, transport=transport) == ["http://a:1"]
    write_registry(path, [entry("http://b:2")])
    with pytest.raises(RegistryError, match="no healthy server"):
        attach_servers(path, transport=transport)


@pytest.mark.parametrize(
    ("log", "cause"),
    [
        ("ModuleNotFoundError: No module named 'vllm'", "vLLM is not installed"),
        ("OSError: [Errno 98] Address already in use", "port is taken"),
        (
            "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2",
            "unsupported head size",
        ),
        ("Repo id must be in the form 'repo_name'", "model directory missing"),
        ("something else", "see the server log"),
    ],
)
def test_usual_startup_failures_are_explained(log: str, cause: str) -> None:
    assert cause in explain_failure(log)


def test_failure_message_finds_the_cause_above_the_shutdown_noise(tmp_path: Path) -> None:
    log = tmp_path / "server-0.log"
    log.write_text("old run: Address already in use\n")
    start = log.stat().st_size
    noise = "".join(f' - leaked function "f{i}"\n' for i in range(50))
    log.write_text(
        log.read_text()
        + "RuntimeError: Unsupported CPU attention configuration: head_dim=16\n"
        + "nanobind: leaked 514 functions!\n"
        + noise
        + "last words\n"
    )
    error = startup_failure(0, "http://127.0.0.1:9", log, start, "exited")
    message = str(error)
    assert "unsupported head size" in message
    assert "port is taken" not in message  # the earlier run's lines are not this failure's
    assert "Unsupported CPU attention configuration" in message
    assert "leaked function" not in message and "last words" in message
    assert len(log_tail(log, 30, since=start).splitlines()) == 2


def test_server_load_is_running_plus_waiting_requests() -> None:
    text = (
        '# HELP vllm:num_requests_running x\nvllm:num_requests_running{engine="0"} 3.0\n'
        'vllm:num_requests_waiting{engine="0"} 2.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 2.0\n'
    )
    assert requests_on_server(text) == 5


def test_processes_of_a_run_finds_its_server_groups_and_notices_when_they_end() -> None:
    import psutil

    from sdp_cli.launcher.process import processes_of, still_running

    server = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        found = processes_of(os.getpid(), [server.pid])
        assert server.pid in {p.pid for p in found}
        assert os.getpid() not in {p.pid for p in found}
        assert server.pid in {p.pid for p in still_running(found)}
    finally:
        server.kill()
        server.wait()
    assert still_running([psutil.Process(os.getpid())]) != []
    assert server.pid not in {p.pid for p in still_running(found)}
