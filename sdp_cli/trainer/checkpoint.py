"""Training checkpoints in `run_dir/checkpoints/step-{N}/`, written atomically.

A checkpoint is written atomically (`common.atomic_dir`, flushed to disk before the rename), so
one that exists under its final name is whole even if the process was killed right after; the
temporary directories of a killed save are never loaded. Contents: model weights
(safetensors), optimizer state, RNG states, and `state.json`
(step, version, data position).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from sdp_cli.common.atomic import atomic_dir, is_leftover
from sdp_cli.common.faults import hold_point
from sdp_cli.errors import ConfigError, SdpError
from sdp_cli.orchestrator.run_state import (
    STATE_FILE,
    TrainState,
    checkpoints_dir,
    list_checkpoints,
    resume_hint,
)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
FORMAT_VERSION = 1
# Write or read a checkpoint's weights and optimizer state in the given directory.
TensorWriter = Callable[[Path], None]
TensorReader = Callable[[Path], None]


class CheckpointWriteError(SdpError):
    """A checkpoint could not be written (directory not writable, disk full); the ones
    written before are untouched."""


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], python_state: list[Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def write_model_tensors(
    target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """The tensors of a one-process trainer: weights as safetensors, the optimizer state."""
    save_model(model, str(target / MODEL_FILE))
    hold_point("checkpoint_write")
    torch.save(optimizer.state_dict(), target / OPTIMIZER_FILE)


def read_model_tensors(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    if (path / "adapter").is_dir():
        raise ConfigError(
            "train.lora.rank",
            f"checkpoint {path} holds a LoRA adapter, and this run trains every weight",
            "resume with the train.lora settings the run was started with",
        )
    if not (path / MODEL_FILE).is_file():
        raise ConfigError(
            "train.world_size",
            f"checkpoint {path} was written by a sharded trainer (FSDP2: train.world_size > 1 "
            "or bfloat16), and this trainer is one float32 process",
            "resume with the train.world_size and train.dtype the run was started with",
        )
    load_model(model, str(path / MODEL_FILE), strict=True, device=_device_of(model))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))


def _write_checkpoint(target: Path, write_tensors: TensorWriter, state: TrainState) -> None:
    write_tensors(target)
    torch.save(_rng_state(), target / RNG_FILE)
    payload = {
        "format": FORMAT_VERSION,
        # Python's random state is a tuple of ints: JSON keeps torch.load's safe mode usable.
        "python_rng": list(random.getstate()),
        **asdict(state),
    }
    (target / STATE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


def _prune(run_dir: Path, keep: int | None) -> None:
    root = checkpoints_dir(run_dir)
    for item in root.iterdir():
        # Leftovers of a save that was killed half-way.
        if is_leftover(item):
            shutil.rmtree(item, ignore_errors=True)
    if keep is not None:
        complete = list_checkpoints(run_dir)
        for _, path in complete[: max(len(complete) - max(keep, 1), 0)]:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int | None = None,
    write_tensors: TensorWriter | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-{state.step}/` and keep the newest `keep` (None: all).
    `write_tensors(dir)` writes the weights and optimizer state (default: `model` and
    `optimizer` as one process holds them)."""
    final = checkpoints_dir(run_dir) / f"step-{state.step}"
    writer = write_tensors or (lambda target: write_model_tensors(target, model, optimizer))
    try:
        with atomic_dir(final, fsync=True) as tmp:
            _write_checkpoint(tmp, writer, state)
        _prune(run_dir, keep)
    except (OSError, SafetensorError) as exc:
        # safetensors reports a failed write (a full disk) as its own error.
        raise CheckpointWriteError(
            f"cannot write checkpoint '{final}': {exc}\n  {resume_hint(run_dir)}"
        ) from exc
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    read_tensors: TensorReader | None = None,
) -> TrainState:
    """Restore weights, optimizer state and RNG states from `path` (a `step-N` directory);
    returns the loop state saved with them. `read_tensors(dir)` replaces the default reading
    of the weights and optimizer state into `model` and `optimizer`."""
    payload = json.loads((path / STATE_FILE).read_text())
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {payload.get('format')}, expected 1")
    if read_tensors is not None:
        read_tensors(path)
    else:
        read_model_tensors(path, model, optimizer)
    _restore_rng(torch.load(path / RNG_FILE, weights_only=True), payload["python_rng"])
    return TrainState(
        step=payload["step"],
        version=payload["version"],
        data_position=payload["data_position"],
        # Absent in checkpoints written before positions were replayed.
        untrained_positions=payload.get("untrained_positions", []),
    )


def _device_of(model: torch.nn.Module) -> str:
    parameter = next(model.parameters(), None)
    return str(parameter.device) if parameter is not None else "cpu"
