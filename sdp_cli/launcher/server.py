"""Start one vLLM server and wait for it to be healthy."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from sdp_cli.config.schema import ServerConfig
from sdp_cli.errors import SdpError
from sdp_cli.launcher.command import check_vllm_installed, vllm_command, vllm_env
from sdp_cli.launcher.process import LaunchSpec, ProcessBackend, ServerProcess, free_port


class ServerStartError(SdpError):
    """A server did not become healthy; the message carries the tail of its log."""


def server_address(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def launch_spec(
    server: ServerConfig,
    model_dir: Path,
    index: int,
    log_dir: Path,
    port: int | None = None,
    taken_ports: set[int] | None = None,
    cuda_devices: list[int] | None = None,
) -> LaunchSpec:
    if port is None:
        start = server.base_port + index if server.base_port else 0
        port = free_port(server.host, start, taken_ports)
    return LaunchSpec(
        index=index,
        command=vllm_command(server, model_dir, port),
        env=vllm_env(server, cuda_devices),
        log_path=log_dir / f"server-{index}.log",
        port=port,
    )


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


_USUAL_CAUSES = (
    (
        "No module named 'vllm'",
        "vLLM is not installed: run scripts/setup.sh or pip install 'sdp-cli[cpu]'",
    ),
    ("Address already in use", "the port is taken: set server.base_port=0 to pick free ports"),
    (
        "head size",
        "unsupported head size: vLLM's CPU backend needs head_dim in {32, 64, 80, 96, 128}",
    ),
    (
        "head_size",
        "unsupported head size: vLLM's CPU backend needs head_dim in {32, 64, 80, 96, 128}",
    ),
    ("does not appear to have a file named config.json", "model directory missing or incomplete"),
    ("Repo id must be", "model directory missing: model.path must be a local directory"),
)


def explain_failure(log: str) -> str:
    for needle, meaning in _USUAL_CAUSES:
        if needle in log:
            return meaning
    return "see the server log above"


def wait_until_healthy(proc: ServerProcess, address: str, timeout_s: float) -> float:
    """Poll /health until it answers 200. Returns seconds waited; raises ServerStartError with
    the last 30 log lines if the process exits or the deadline passes."""
    start = time.monotonic()
    deadline = start + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                break
            try:
                if client.get(f"{address}/health").status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    tail = log_tail(proc.spec.log_path)
    what = "exited" if proc.poll() is not None else f"was not healthy after {timeout_s:.0f} s"
    raise ServerStartError(
        f"vLLM server {proc.spec.index} at {address} {what} ({explain_failure(tail)}).\n"
        f"--- last lines of {proc.spec.log_path} ---\n{tail}"
    )


def start_server(
    backend: ProcessBackend,
    server: ServerConfig,
    model_dir: Path,
    index: int,
    log_dir: Path,
    taken_ports: set[int] | None = None,
) -> tuple[ServerProcess, str]:
    """Spawn a server (without waiting for it). Returns the process and its address."""
    check_vllm_installed()
    spec = launch_spec(server, model_dir, index, log_dir, taken_ports=taken_ports)
    proc = backend.start(spec)
    return proc, server_address(server.host, spec.port)
