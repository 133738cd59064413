"""Where a run stands between steps, and where its checkpoints live: what the training loop
needs to continue after a resume. The tensors themselves are the trainer's (trainer/checkpoint.py);
this half imports no torch, so the loop and the simulator can use it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What the training loop needs besides the tensors to continue where it stopped."""

    step: int
    version: int
    # Next unused data position of the task's prompt stream ...
    data_position: int
    # ... and the positions below it not trained yet (in flight, buffered or waiting for a
    # replay when the checkpoint was written); a resumed run generates them first.
    untrained_positions: list[int] = field(default_factory=list)
    # task.curriculum's schedule (tasks/levels.py CurriculumState.to_json()); None when off.
    curriculum: dict[str, Any] | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def checkpoint_due(step: int, every: int) -> bool:
    """Whether to save after finishing `step` (1-based count of completed steps)."""
    return step > 0 and step % every == 0


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        match = _STEP_DIR.match(item.name)
        if match and (item / STATE_FILE).is_file():
            found.append((int(match.group(1)), item))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def resume_hint(run_dir: Path) -> str:
    """Where a run stopped by a failed write can continue from."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint was written before: fix the directory and start the run again"
    return (
        f"the previous checkpoint '{latest}' is intact: fix the directory and continue with "
        "resume=true"
    )
