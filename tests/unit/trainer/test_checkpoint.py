"""Checkpoints (atomic, resumable) and weight export (a model directory vLLM can load)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.orchestrator.run_state import (
    TrainState,
    checkpoint_due,
    latest_checkpoint,
    list_checkpoints,
)
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.checkpoint import load_checkpoint, save_checkpoint
from sdp_cli.weight_sync.export import (
    export_weights,
    reserve_export_files,
    tensors_for_servers,
    write_safetensors,
)
from sdp_cli.weight_sync.versions import SPARE_DIR, spare_files

PROMPT = [1, 5, 6, 45]


def trained_actor(model_dir: Path, steps: int = 1) -> Actor:
    actor = Actor(model_dir, replace(TrainConfig(), lr=1e-2, keep_weights=2), seed=0)
    for version in range(steps):
        train_once(actor, version)
    return actor


def train_once(actor: Actor, version: int) -> dict[str, float]:
    outputs = [[7, 8, 2], [9, 2]]
    behav = actor.score([PROMPT, PROMPT], outputs)
    samples = [
        Trajectory(PROMPT, out, lp, [version] * len(out), reward=float(i == 0))
        for i, (out, lp) in enumerate(zip(outputs, behav, strict=True))
    ]
    return actor.train_step([RolloutGroup(version, samples)], version=version)


def state(step: int) -> TrainState:
    return TrainState(step=step, version=step, data_position=8 * step)


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = trained_actor(tiny_model_dir, steps=2)
    path = save_checkpoint(tmp_path, actor.model, actor.optimizer, state(2))
    assert path == tmp_path / "checkpoints" / "step-2"
    expected_draws = (torch.rand(3), random.random())
    train_once(actor, 2)  # the run continues, then dies
    after_three = [p.detach().clone() for p in actor.model.parameters()]

    resumed = Actor(tiny_model_dir, replace(TrainConfig(), lr=1e-2), seed=123)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), resumed.model, resumed.optimizer)
    assert loaded == state(2)
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert random.random() == expected_draws[1]
    train_once(resumed, 2)
    for a, b in zip(after_three, resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)


def test_latest_checkpoint_ignores_half_written_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    actor = trained_actor(tiny_model_dir, steps=0)
    save_checkpoint(tmp_path, actor.model, actor.optimizer, state(10))
    # A save killed before its rename, and one killed before writing state.json.
    (tmp_path / "checkpoints" / "step-20.tmp-99999").mkdir()
    (tmp_path / "checkpoints" / "step-30").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"
    save_checkpoint(tmp_path, actor.model, actor.optimizer, state(11))
    assert not (tmp_path / "checkpoints" / "step-20.tmp-99999").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-11"


def test_old_checkpoints_are_pruned_and_a_step_can_be_saved_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = trained_actor(tiny_model_dir, steps=0)
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, actor.model, actor.optimizer, state(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    save_checkpoint(tmp_path, actor.model, actor.optimizer, state(15), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-15"]
    payload = json.loads((tmp_path / "checkpoints" / "step-15" / "state.json").read_text())
    assert payload["step"] == 15 and payload["data_position"] == 8 * 15


def test_checkpoint_due_every_k_steps() -> None:
    assert [s for s in range(0, 31) if checkpoint_due(s, 10)] == [10, 20, 30]


# --- weight export ---


def test_exported_weights_are_a_loadable_model_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    actor = trained_actor(tiny_model_dir, steps=1)
    out = actor.export_weights(tmp_path / "weights", version=1)
    assert out == tmp_path / "weights" / "v1"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    tensors = load_file(out / "model.safetensors")
    for name, param in actor.model.state_dict().items():
        assert torch.equal(tensors[name], param), name
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # The same directory works as a fresh `--model DIR`.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for a, b in zip(reloaded.parameters(), actor.model.parameters(), strict=True):
        assert torch.equal(a, b)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("12=")["input_ids"] == [5, 6, 45]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_export_in_the_servers_dtype_writes_the_checkpoints_tensors(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = trained_actor(tiny_model_dir, steps=1)
    out = actor.export_weights(tmp_path / "weights", version=1, dtype=torch.bfloat16)
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == load_file(tiny_model_dir / "model.safetensors").keys()
    for name, param in actor.model.state_dict().items():
        assert tensors[name].dtype == torch.bfloat16, name
        assert torch.equal(tensors[name], param.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The trainer's own config is not changed by the export.
    assert actor.model.config.dtype == torch.float32


def test_only_the_checkpoints_tensors_go_to_the_servers() -> None:
    weight = torch.randn(4, 3)
    # A tied LM head is the embedding under a second name, which the checkpoint does not hold.
    state = {"embed.weight": weight, "lm_head.weight": weight, "norm.weight": torch.ones(3)}
    tensors = tensors_for_servers(state, frozenset({"embed.weight", "norm.weight"}), None)
    assert tensors is not None and sorted(tensors) == ["embed.weight", "norm.weight"]
    # Names the checkpoint has and the model does not (a renamed architecture): no direct write.
    assert tensors_for_servers(state, frozenset({"model.embed.weight"}), None) is None


@pytest.mark.parametrize("most_per_call", [None, 7])
def test_direct_safetensors_file_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most_per_call: int | None
) -> None:
    if most_per_call is not None:
        # A kernel that writes only part of what one writev call is given, every time.
        writev = os.writev

        def short_writev(fd: int, buffers: list[memoryview]) -> int:
            return writev(fd, [bytes(memoryview(buffers[0])[:most_per_call])])

        monkeypatch.setattr(os, "writev", short_writev)
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.float32).to(torch.bfloat16),
        # A transposed view: written in its logical order.
        "c": torch.randn(5, 3).t(),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_export_keeps_the_newest_versions_and_cleans_leftovers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = trained_actor(tiny_model_dir, steps=0)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / "v0.tmp-99999").mkdir()  # a killed export
    for version in range(1, 5):
        export_weights(actor.model, tiny_model_dir, weights_dir, version, keep=2)
    assert sorted(p.name for p in weights_dir.iterdir()) == [SPARE_DIR, "v3", "v4"]
    # Exporting a version again (after a resume) replaces it.
    export_weights(actor.model, tiny_model_dir, weights_dir, 4, keep=2)
    assert sorted(p.name for p in weights_dir.iterdir()) == [SPARE_DIR, "v3", "v4"]
    assert (weights_dir / "v4" / "model.safetensors").is_file()


def test_exports_write_over_the_reserved_and_the_pruned_weight_files(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = trained_actor(tiny_model_dir, steps=0)
    weights_dir = tmp_path / "weights"
    reserve = partial(reserve_export_files, actor.model, tiny_model_dir, weights_dir, 2, None)
    # The two kept versions and the one being written.
    assert reserve() == 3 and reserve() == 0
    reserved = {path.stat().st_ino for path in spare_files(weights_dir)}
    written = set()
    for version in range(1, 8):
        export_weights(actor.model, tiny_model_dir, weights_dir, version, keep=2)
        versions = [p for p in weights_dir.iterdir() if p.name.startswith("v")]
        assert len(versions) + len(spare_files(weights_dir)) == 3
        written.add((weights_dir / f"v{version}" / "model.safetensors").stat().st_ino)
    # Every export wrote over a reserved file (they are never deleted, so their inode numbers
    # cannot come back for a new file).
    assert written == reserved
    path = weights_dir / "v7" / "model.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    state = actor.model.state_dict()
    back = load_file(path)
    data = sum(tensor.numel() * tensor.element_size() for tensor in back.values())
    assert path.stat().st_size == 8 + header + data, "the reserved room past the end is cut"
    for name, tensor in back.items():
        assert torch.equal(tensor, state[name]), name
