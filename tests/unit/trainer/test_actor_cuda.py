"""The actor with `train.device=cuda` (the trainer runs on CPU or CUDA).

Marked `cuda`: where torch sees no GPU, conftest deselects them (reported as deselected);
on a machine with one they run with the rest of the suite.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdp_cli.config.server_settings import Device
from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor

pytestmark = pytest.mark.cuda

PROMPTS = [[1, 5, 6, 7, 45], [1, 8, 45], [1, 5, 5, 5, 5, 5, 5, 5, 45]]
OUTPUTS = [[9, 9, 2], [10, 11, 12, 13, 14, 15, 2], [7]]


def make_actor(model_dir: Path, device: Device) -> Actor:
    return Actor(model_dir, replace(TrainConfig(), device=device), seed=0)


def stale_groups(scores: list[list[float]], version: int) -> list[RolloutGroup]:
    """Two groups of three samples with tokens of versions v−2..v, μ and p off the policy."""
    groups = []
    for g in range(2):
        samples = []
        for k in range(3):
            index = (g + k) % 3
            output = OUTPUTS[index]
            n = len(output)
            versions = [version - (t + k) % 3 for t in range(n)]
            behav = [lp - 0.3 * ((t + k) % 3) for t, lp in enumerate(scores[index])]
            samples.append(
                Trajectory(
                    PROMPTS[index],
                    output,
                    behav,
                    versions,
                    prox_logprobs=[lp + 0.25 for lp in behav],
                    reward=float(k == g),
                )
            )
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def parameters(actor: Actor) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in actor.model.parameters()]


def test_the_actor_runs_on_the_gpu_and_scores_like_the_cpu_actor(tiny_model_dir: Path) -> None:
    gpu = make_actor(tiny_model_dir, Device.cuda)
    assert next(gpu.model.parameters()).device.type == "cuda"
    cpu = make_actor(tiny_model_dir, Device.cpu)
    for on_gpu, on_cpu in zip(
        gpu.score(PROMPTS, OUTPUTS), cpu.score(PROMPTS, OUTPUTS), strict=True
    ):
        assert on_gpu == pytest.approx(on_cpu, abs=1e-4)


def test_a_gpu_train_step_matches_the_cpu_step(tiny_model_dir: Path) -> None:
    gpu = make_actor(tiny_model_dir, Device.cuda)
    cpu = make_actor(tiny_model_dir, Device.cpu)
    groups = stale_groups(cpu.score(PROMPTS, OUTPUTS), version=4)
    before = parameters(cpu)
    gpu_stats = gpu.train_step(groups, version=4)
    cpu_stats = cpu.train_step(groups, version=4)
    assert gpu_stats["loss"] == pytest.approx(cpu_stats["loss"], abs=1e-5)
    assert gpu_stats["grad_norm"] == pytest.approx(cpu_stats["grad_norm"], rel=1e-4)
    moved = torch.cat([(a - b).flatten() for a, b in zip(parameters(cpu), before, strict=True)])
    assert float(moved.abs().max()) > 1e-5
    gap = torch.cat(
        [(a - b).flatten() for a, b in zip(parameters(gpu), parameters(cpu), strict=True)]
    ).abs()
    # AdamW's first step moves each weight by about lr·sign(gradient), so a weight whose
    # gradient is ~0 may move either way on either device: at most 2·lr apart, and rare.
    lr = TrainConfig().lr
    assert float(gap.max()) <= 2 * lr + 1e-6
    assert float((gap > 1e-5).float().mean()) < 1e-2


def test_gpu_train_steps_are_deterministic(tiny_model_dir: Path) -> None:
    runs = []
    for _ in range(2):
        actor = make_actor(tiny_model_dir, Device.cuda)
        groups = stale_groups(actor.score(PROMPTS, OUTPUTS), version=2)
        losses = [actor.train_step(groups, version=2)["loss"] for _ in range(3)]
        runs.append((losses, parameters(actor)))
    (losses1, weights1), (losses2, weights2) = runs
    assert losses1 == losses2
    assert all(torch.equal(a, b) for a, b in zip(weights1, weights2, strict=True))


def test_weights_exported_from_the_gpu_load_back_on_the_cpu(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    gpu = make_actor(tiny_model_dir, Device.cuda)
    gpu.train_step(stale_groups(gpu.score(PROMPTS, OUTPUTS), version=1), version=1)
    exported = gpu.export_weights(tmp_path / "weights", 2)
    reloaded = make_actor(exported, Device.cpu)
    for on_gpu, on_cpu in zip(
        gpu.score(PROMPTS, OUTPUTS), reloaded.score(PROMPTS, OUTPUTS), strict=True
    ):
        assert on_gpu == pytest.approx(on_cpu, abs=1e-4)
