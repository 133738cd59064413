from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from sdp_cli.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "train",
        "launch-servers",
        "inspect-staleness",
        "simulate",
        "init-model",
        "config",
    ):
        assert command in result.output


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdp_cli", "config", "show", "rollout.batch_size=3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "batch_size: 3" in result.stdout
