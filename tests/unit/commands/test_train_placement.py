"""`sdp train` without servers: where it runs its CPU servers and trainer (run.split_cpus), and
its closing line."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from rich.console import Console

from sdp_cli.commands.train import TrainSummary, pinned_to, print_summary, with_cpu_placement
from sdp_cli.config import load_config
from sdp_cli.orchestrator.loop import LoopResult


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_cpu_servers_and_a_cpu_trainer_get_disjoint_cores(four_cores: None) -> None:
    placed = with_cpu_placement(load_config())
    assert placed.server.cpu_cores == [0, 1, 2]
    assert placed.train.cpu_cores == [3]


@pytest.mark.parametrize(
    "override",
    [
        "run.split_cpus=false",
        # With η = 0 the servers and the trainer take turns.
        "rollout.max_staleness=0",
        "server.cpu_cores=[1]",
        "train.cpu_cores=[2]",
        # Attached servers are not this process's to place.
        "server.registry=/nonexistent/servers.json",
    ],
)
def test_placement_is_left_alone_when_told_or_not_ours(four_cores: None, override: str) -> None:
    cfg = load_config(overrides=[override])
    placed = with_cpu_placement(cfg)
    assert (placed.server.cpu_cores, placed.train.cpu_cores) == (
        cfg.server.cpu_cores,
        cfg.train.cpu_cores,
    )


def test_pinned_to_moves_this_thread_and_the_threads_it_starts_then_restores() -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    seen: list[set[int]] = []
    with pinned_to([core]):
        assert os.sched_getaffinity(0) == {core}
        thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join()
    assert seen == [{core}]
    assert os.sched_getaffinity(0) == before


def test_the_closing_line_says_which_time_is_which(tmp_path: Path) -> None:
    console = Console(record=True, width=300)
    result = LoopResult(steps=30, version=30, rewards=[0.5] * 30, wall_s=9.54)
    print_summary(TrainSummary(tmp_path, result, resumed_from=0, elapsed_s=39.2), console)
    line = console.export_text()
    # The header's "elapsed" runs from run_started; the loop is part of it.
    assert "done: 30 steps, version 30; training loop 9.5 s of 39.2 s elapsed" in line
