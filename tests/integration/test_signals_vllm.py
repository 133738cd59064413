"""Signals while a real vLLM server starts: `sdp train` / `sdp launch-servers` started in the
background by a shell script (SIGINT inherited as ignored) stop quietly, leaving no process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from sdp_cli.launcher import read_registry
from sdp_cli.launcher.process import group_alive
from tests.unit.commands.test_signals import BackgroundSdp, assert_quiet

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize(
    ("command", "signum", "expected_code"),
    [
        ("launch-servers", signal.SIGINT, 130),
        ("launch-servers", signal.SIGTERM, 0),
        ("train", signal.SIGINT, 130),
        ("train", signal.SIGTERM, 128 + signal.SIGTERM),
    ],
)
def test_a_signal_while_vllm_starts_stops_everything_quietly(
    tmp_path: Path, tiny_model_dir: Path, command: str, signum: int, expected_code: int
) -> None:
    """Started in the background by a script, signalled while its vLLM server is still
    starting (the cheapest moment: no server ever gets ready): the exit code of the signal,
    no traceback or asyncio noise, no process left, the registry says dead."""
    run_dir = tmp_path / "run"
    args = [command, f"run.dir={run_dir}", f"model.path={tiny_model_dir}", "server.count=1"]
    sdp = BackgroundSdp(args, tmp_path)
    registry = run_dir / "servers.json"
    deadline = time.monotonic() + 120
    while not (registry.exists() and all(e.pid for e in read_registry(registry) or [None])):
        assert time.monotonic() < deadline, sdp.output()
        time.sleep(0.1)
    [entry] = read_registry(registry)
    assert entry.state == "starting" and group_alive(entry.pgid)
    processes = sdp.descendants()
    time.sleep(2.0)  # the server is importing vLLM
    os.kill(sdp.pid, signum)
    assert sdp.exit_code(60) == expected_code, sdp.output()
    assert_quiet(sdp.output())
    assert not group_alive(entry.pgid)
    left = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []
    assert read_registry(registry)[0].state == "dead"
