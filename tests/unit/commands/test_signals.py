"""How commands stop on signals (sdp_cli/commands/signals.py), in-process and as a real `sdp`
process started in the background by a shell script (which inherits SIGINT as ignored). The same
signals while a real vLLM server starts are in tests/integration/test_signals_vllm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sdp_cli.commands.signals import Terminated, signals_ignored, stop_on_signals


def test_sigterm_raises_terminated_with_exit_code_143_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)  # the handler raises as soon as the signal arrives
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigint_interrupts_even_when_it_was_inherited_as_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5.0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_shutdown_in_signals_ignored_is_not_cut_short() -> None:
    with stop_on_signals():
        with signals_ignored():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)


def start_in_background_from_a_script(command: list[str], log: Path) -> int:
    """Start `command` as a non-interactive shell starts `cmd &` (SIGINT and SIGQUIT ignored);
    returns its pid."""
    quoted = " ".join(f"'{part}'" for part in command)
    script = f"{quoted} >'{log}' 2>&1 & echo $!"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def wait_for_exit(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} did not exit within {timeout_s} s")


def ignores_sigint(pid: int) -> bool:
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return bool(int(fields["SigIgn"], 16) & (1 << (signal.SIGINT - 1)))


class BackgroundSdp:
    """`sdp ARGS` started by a shell script in the background, as `sdp ... &` in a script does
    (SIGINT inherited as ignored). A wrapper shell records the exit code, since the process is
    not this test's child."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.log = tmp_path / "sdp-output.txt"
        self.exit_file = tmp_path / "sdp-exit-code"
        quoted = " ".join(f"'{a}'" for a in args)
        inner = (
            f"'{sys.executable}' -m sdp_cli {quoted} >'{self.log}' 2>&1; "
            f"echo $? >'{self.exit_file}'"
        )
        self.wrapper = start_in_background_from_a_script(["bash", "-c", inner], tmp_path / "w")
        self.pid = self._sdp_pid()

    def _sdp_pid(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = subprocess.run(
                ["pgrep", "-P", str(self.wrapper)], capture_output=True, text=True
            ).stdout.split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise AssertionError("sdp did not start")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def exit_code(self, timeout_s: float) -> int:
        wait_for_exit(self.wrapper, timeout_s)
        return int(self.exit_file.read_text())

    def output(self) -> str:
        return self.log.read_text()


def assert_quiet(output: str) -> None:
    assert "Traceback" not in output, output
    assert "Task was destroyed" not in output, output
    assert "Exception ignored" not in output, output


def test_kill_int_stops_a_command_a_script_started_in_the_background(tmp_path: Path) -> None:
    """A long `sdp simulate` in wall time (no vLLM needed) stands for any command: the
    handlers are installed by the command layer, the same for every command."""
    sdp = BackgroundSdp(["simulate", "simulate.time_scale=1", "train.steps=100000"], tmp_path)
    assert ignores_sigint(sdp.pid), "the shell should have started it with SIGINT ignored"
    time.sleep(5.0)  # past the imports, into the simulation
    os.kill(sdp.pid, signal.SIGINT)
    assert sdp.exit_code(30) == 130, sdp.output()
    assert "interrupted" in sdp.output()
    assert_quiet(sdp.output())
