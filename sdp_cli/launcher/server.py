"""One vLLM server's launch spec and log, and why it did not start (the fleet starts and waits)."""

from __future__ import annotations

import re
from pathlib import Path

from sdp_cli.config.server_settings import ServerConfig
from sdp_cli.errors import SdpError
from sdp_cli.launcher.command import vllm_command, vllm_env
from sdp_cli.launcher.process import LaunchSpec

TAIL_LINES = 30


class ServerStartError(SdpError):
    """A server did not become healthy; the message carries the tail of its log."""


class PortTakenError(ServerStartError):
    """The server could not bind its port (another process took it after it was picked)."""


def server_address(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def launch_spec(
    server: ServerConfig,
    model_dir: Path,
    index: int,
    log_dir: Path,
    port: int,
    cuda_devices: list[str] | None = None,
) -> LaunchSpec:
    return LaunchSpec(
        index=index,
        command=vllm_command(server, model_dir, port),
        env=vllm_env(server, cuda_devices),
        log_path=log_dir / f"server-{index}.log",
        port=port,
        cpu_cores=list(server.cpu_cores),
    )


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_log(path: Path, since: int = 0) -> str:
    """The log text written after byte offset `since` (a restart appends to the same file)."""
    try:
        with path.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# Shutdown chatter of vLLM's native extensions that would push the real error out of the tail.
_NOISE_PREFIXES = ("nanobind:", " - leaked", "See https://nanobind")


def log_tail(path: Path, lines: int = TAIL_LINES, since: int = 0) -> str:
    text = read_log(path, since)
    if not text:
        return "(no log written)"
    kept = [line for line in text.splitlines() if not line.startswith(_NOISE_PREFIXES)]
    return "\n".join(kept[-lines:])


_HEAD_SIZE = (
    "unsupported head size: vLLM's CPU attention needs head_dim (hidden_size / num_heads) in "
    "{32, 64, 80, 96, 112, 128}; change model.hidden_size or model.num_heads"
)
_USUAL_CAUSES = (
    (
        "No module named 'vllm'",
        "vLLM is not installed: run scripts/setup.sh or pip install 'sdp-cli[cpu]'",
    ),
    ("Address already in use", "the port is taken: set server.base_port=0 to pick free ports"),
    ("Unsupported CPU attention configuration", _HEAD_SIZE),
    ("head size", _HEAD_SIZE),
    ("head_size", _HEAD_SIZE),
    (
        "does not appear to have a file named config.json",
        "model directory missing or incomplete: model.path must hold config.json and weights",
    ),
    ("Repo id must be", "model directory missing: model.path must be an existing local directory"),
    ("No such file or directory", "a file the server needs is missing (model directory?)"),
)


# An exception line as Python prints it ("RuntimeError: ...", "torch.OutOfMemoryError: ...").
_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception)\b:? ?.*$")


def last_error(log_path: Path, since: int = 0) -> str | None:
    """The last exception line the server logged after byte offset `since`; else its last
    line marked ERROR; else None."""
    lines = [line.strip() for line in read_log(log_path, since).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_NOISE_PREFIXES)]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:300]
    for line in reversed(lines):
        if "ERROR" in line:
            return line[:300]
    return None


def explain_failure(log: str) -> str:
    for needle, meaning in _USUAL_CAUSES:
        if needle in log:
            return meaning
    return "see the server log above"


def startup_failure(
    index: int, address: str, log_path: Path, since: int, what: str
) -> ServerStartError:
    """The error for a server that did not come up: the usual cause (looked for in everything
    it logged since it was spawned) and its last log lines."""
    text = read_log(log_path, since)
    cause = explain_failure(text)
    error = PortTakenError if "Address already in use" in text else ServerStartError
    return error(
        f"vLLM server {index} at {address} {what} ({cause}).\n"
        f"--- last {TAIL_LINES} lines of {log_path} ---\n{log_tail(log_path, since=since)}"
    )
