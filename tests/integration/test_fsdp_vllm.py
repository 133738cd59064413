"""`sdp train train.world_size=2` end to end on real vLLM CPU servers: two FSDP2 gloo ranks
train, export weights the servers load, checkpoint; SIGKILL of rank 0 leaves no process of the
run (rank or server); the run resumes from its last checkpoint and completes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sdp_cli.events.event_schema import RunStartedEvent, TrainStepEvent, WeightUpdateEvent
from tests.integration.test_train_e2e import (
    SMALL,
    descendants_alive,
    events_of,
    still_running_after,
    train,
)

pytestmark = pytest.mark.vllm

RANKS = ["train.world_size=2", "train.steps=4", "train.checkpoint_every=2"]


def is_trainer_rank(process: psutil.Process) -> bool:
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def test_two_ranks_train_checkpoint_survive_a_crash_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "fsdp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdp_cli", "train", f"run.dir={run_dir}", *SMALL, *RANKS],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step-2").is_dir():
            assert proc.poll() is None, "sdp train exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            children = descendants_alive(proc.pid) or children
            time.sleep(0.2)
        children = descendants_alive(proc.pid) or children
        # Read before the kill: a dead process has no command line to read.
        ranks = [p for p in children if is_trainer_rank(p)]
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(ranks) == 1, "rank 0 should have started rank 1"
    assert len(children) > len(ranks), "rank 0 should have started a server"
    # Rank 1 dies by its parent-death signal, the servers by their guard's watchdog.
    assert still_running_after(children, 15.0) == []
    assert (run_dir / "checkpoints" / "step-2" / "sharded" / ".metadata").is_file()
    assert (run_dir / "logs" / "trainer-rank1.log").is_file()

    train(run_dir, *RANKS, "resume=true")
    started = [e for e in events_of(run_dir, RunStartedEvent) if e.resumed_from_step]
    assert [e.resumed_from_step for e in started] == [2]
    steps = events_of(run_dir, TrainStepEvent)
    assert [s.step for s in steps if s.step >= 2][-2:] == [2, 3]
    assert all(s.loss is not None and s.grad_norm is not None for s in steps)
    # Every update exported the gathered full weights and every server reloaded them.
    updates = events_of(run_dir, WeightUpdateEvent)
    assert updates[-1].version == 4 and "reload_s" in updates[-1].phases
    assert (run_dir / "weights" / "v4" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-4" / "sharded" / ".metadata").is_file()
    # The finished run left no rank behind.
    assert [p.pid for p in psutil.Process().children(recursive=True) if is_trainer_rank(p)] == []
