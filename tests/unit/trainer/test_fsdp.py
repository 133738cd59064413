"""The FSDP2 trainer on CPU with gloo: two ranks take the same step as one, export full weights,
checkpoint and resume, and a dead rank stops the trainer (SIGKILL of rank 0 is in
test_fsdp_vllm.py, with `sdp train` itself).

Rank 0 runs in a spawned child (as `sdp train` would run it), which spawns rank 1 itself."""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sdp_cli.commands.preflight import check_trainer_device, chosen_devices
from sdp_cli.config import load_config
from sdp_cli.config.schema import SdpConfig
from sdp_cli.errors import ConfigError
from sdp_cli.launcher.devices import visible_cuda_devices
from sdp_cli.launcher.process import free_port
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.batch import TokenSample
from sdp_cli.trainer.checkpoint import load_checkpoint, read_model_tensors, save_checkpoint
from sdp_cli.trainer.distributed import TrainerRankDied, rank_info
from sdp_cli.trainer.fsdp import split_across_ranks, trainer_actor

PROMPTS = [[1, 5, 6, 7, 45], [1, 8, 45], [1, 5, 5, 5, 5, 5, 5, 5, 45], [1, 9, 9, 45]]
OUTPUTS = [[9, 9, 2], [10, 11, 12, 13, 14, 15, 2], [7], [20, 21, 22, 23, 2]]
# Small micro-batches: ranks get different numbers of them, so the idle batch is exercised.
# The default lr: Adam's first step moves a weight by about lr·g/|g|, so where |g| is near
# Adam's eps the float32 summation order (1 rank against 2) shows at lr × 1e-3 (3e-5 at 1e-2).
OVERRIDES = ["train.micro_batch_tokens=40", "train.grad_clip=0.5"]


def config(world_size: int, *extra: str) -> SdpConfig:
    cfg = load_config(overrides=[*OVERRIDES, f"train.world_size={world_size}", *extra])
    return replace(cfg, train=replace(cfg.train, master_port=free_port()))


def stale_groups(actor: Actor, version: int) -> list[RolloutGroup]:
    """Four groups of three, with tokens from versions v−2..v and μ, p off the policy."""
    groups = []
    for g, prompt in enumerate(PROMPTS):
        outputs = [OUTPUTS[(g + k) % len(OUTPUTS)] for k in range(3)]
        behav = actor.score([prompt] * 3, outputs)
        samples = []
        for k, (out, lp) in enumerate(zip(outputs, behav, strict=True)):
            versions = [version - (t + k) % 3 for t in range(len(out))]
            mu = [x - 0.3 * ((t + k) % 3) for t, x in enumerate(lp)]
            sample = Trajectory(prompt, out, mu, versions, reward=float((g + k) % 2))
            sample.prox_logprobs = [x + 0.25 for x in mu]
            samples.append(sample)
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def spawn(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def finish(process: multiprocessing.process.BaseProcess, timeout_s: float = 120.0) -> None:
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        pytest.fail("rank 0 did not finish in time")
    assert process.exitcode == 0


def _step_on_ranks(cfg: SdpConfig, model_dir: Path, groups: list, out: Path) -> None:
    """Rank 0: one step, export the full weights, checkpoint, then resume into new ranks."""
    with trainer_actor(cfg, model_dir, out / "logs") as actor:
        stats = actor.train_step(groups, 2)
        actor.export_weights(out / "weights", 1)
        save_checkpoint(
            out, actor.model, actor.optimizer, TrainState(1, 1, 0), None, actor.save_tensors
        )
        second = actor.train_step(groups, 2)
    # A fresh rendezvous, as a resumed `sdp train` would make.
    cfg = replace(cfg, train=replace(cfg.train, master_port=free_port()))
    with trainer_actor(cfg, model_dir, out / "logs") as actor:
        load_checkpoint(
            out / "checkpoints" / "step-1", actor.model, actor.optimizer, actor.load_tensors
        )
        resumed = actor.train_step(groups, 2)
    (out / "stats.json").write_text(
        json.dumps({"first": stats, "second": second, "resumed": resumed})
    )


def test_two_ranks_take_the_same_step_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    single = Actor(tiny_model_dir, config(1).train)
    groups = stale_groups(single, 2)
    expected = single.train_step(groups, 2)
    expected_weights = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    expected_second = single.train_step(groups, 2)

    finish(spawn(_step_on_ranks, config(2), tiny_model_dir, groups, tmp_path))
    stats = json.loads((tmp_path / "stats.json").read_text())

    first = stats["first"]
    assert first["n_tokens"] == expected["n_tokens"]
    assert abs(first["loss"] - expected["loss"]) < 1e-6
    assert abs(first["grad_norm"] - expected["grad_norm"]) < 1e-5
    # The norm is over the full gradient, and large enough that clipping acted.
    assert expected["grad_norm"] > 0.5
    exported = load_file(tmp_path / "weights" / "v1" / "model.safetensors")
    assert exported.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        torch.testing.assert_close(exported[name], value, atol=1e-5, rtol=0, msg=name)
    # The sharded optimizer state carries over to a second step, and through a checkpoint.
    assert abs(stats["second"]["loss"] - expected_second["loss"]) < 1e-6
    assert abs(stats["resumed"]["loss"] - expected_second["loss"]) < 1e-6
    assert (tmp_path / "checkpoints" / "step-1" / "sharded" / ".metadata").is_file()


def _kill_rank1_then_step(cfg: SdpConfig, model_dir: Path, groups: list, out: Path) -> None:
    try:
        with trainer_actor(cfg, model_dir, out / "logs") as actor:
            (rank1,) = psutil.Process().children()
            rank1.kill()
            # Not psutil's wait: reaping it here would hide its exit status from rank 0.
            while rank1.status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.05)
            actor.train_step(groups, 0)
    except TrainerRankDied as exc:
        children = psutil.Process().children(recursive=True)
        left = [p.pid for p in children if "spawn_main" in " ".join(p.cmdline())]
        (out / "error.txt").write_text(f"{exc}\nleft: {left}")


def test_a_dead_rank_stops_the_trainer_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    groups = stale_groups(Actor(tiny_model_dir, config(1).train), 0)
    finish(spawn(_kill_rank1_then_step, config(2), tiny_model_dir, groups, tmp_path))
    error = (tmp_path / "error.txt").read_text()
    assert "trainer rank 1" in error and "SIGKILL" in error
    assert "trainer-rank1.log" in error
    assert error.endswith("left: []")


def _sample(prompt: int, output: int) -> TokenSample:
    return TokenSample(
        [1] * prompt, [2] * output, [0.0] * output, [0.0] * output, [0] * output, 0, 0
    )


def test_ranks_get_shares_of_about_equal_tokens() -> None:
    samples = [_sample(2, n) for n in (30, 2, 3, 12, 9, 4, 1, 8)]
    shares = split_across_ranks(samples, 2)
    loads = [sum(s.length for s in share) for share in shares]
    assert sum(len(share) for share in shares) == len(samples)
    assert max(loads) - min(loads) <= max(s.length for s in samples)
    # Order within a share follows the batch.
    for share in shares:
        positions = [samples.index(s) for s in share]
        assert positions == sorted(positions)


def test_fewer_samples_than_ranks_leaves_a_share_empty() -> None:
    shares = split_across_ranks([_sample(1, 3)], 3)
    assert [len(share) for share in shares] == [1, 0, 0]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["server.gpu_ids=[0]", "train.gpu_ids=[0]"], "train.gpu_ids"),
        (["train.world_size=2", "train.gpu_ids=[1]"], "train.gpu_ids"),
        (["server.count=2", "server.gpu_ids=[0]"], "server.gpu_ids"),
        (["train.nnodes=2", "train.node_rank=2", "train.master_port=29500"], "train.node_rank"),
        (["train.nnodes=2"], "train.master_port"),
    ],
)
def test_rank_and_device_settings_are_checked(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(overrides=overrides)
    assert raised.value.key == key


def test_bfloat16_on_a_cpu_trainer_is_a_config_error() -> None:
    cfg = load_config(overrides=["train.device=cpu", "train.dtype=bfloat16"])
    with pytest.raises(ConfigError) as raised:
        check_trainer_device(cfg)
    assert raised.value.key == "train.dtype"


def test_gpu_ids_beyond_the_visible_devices_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        chosen_devices("server.gpu_ids", [len(visible_cuda_devices())])
    assert "not visible" in raised.value.problem


def test_a_sharded_checkpoint_refused_by_a_one_process_trainer(tmp_path: Path) -> None:
    (tmp_path / "sharded").mkdir()
    with pytest.raises(ConfigError) as raised:
        read_model_tensors(tmp_path, torch.nn.Linear(2, 2), None)
    assert raised.value.key == "train.world_size"


def test_ranks_are_numbered_node_by_node() -> None:
    nodes = ["train.nnodes=3", "train.node_rank=1", "train.master_port=1"]
    train = load_config(overrides=["train.world_size=2", *nodes]).train
    infos = [rank_info(train, local) for local in (0, 1)]
    assert [(i.rank, i.world_size, i.is_main) for i in infos] == [(2, 6, False), (3, 6, False)]


def test_two_ranks_train_the_same_lora_adapter_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """train.lora.rank with FSDP2 (and the default selective activation checkpointing): the
    same step, the adapter alone exported and checkpointed, and a resume that continues it."""
    from sdp_cli.trainer.adapter import adapter_tensors

    single = Actor(tiny_model_dir, config(1, "train.lora.rank=8").train)
    groups = stale_groups(single, 2)
    expected = single.train_step(groups, 2)
    assert single.peft is not None
    expected_adapter = {k: v.clone() for k, v in adapter_tensors(single.peft, single.model).items()}
    expected_second = single.train_step(groups, 2)

    finish(spawn(_step_on_ranks, config(2, "train.lora.rank=8"), tiny_model_dir, groups, tmp_path))
    stats = json.loads((tmp_path / "stats.json").read_text())

    assert abs(stats["first"]["loss"] - expected["loss"]) < 1e-6
    assert abs(stats["first"]["grad_norm"] - expected["grad_norm"]) < 1e-5
    exported = load_file(tmp_path / "weights" / "v1" / "adapter_model.safetensors")
    assert sorted(p.name for p in (tmp_path / "weights" / "v1").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert exported.keys() == expected_adapter.keys()
    for name, value in expected_adapter.items():
        torch.testing.assert_close(exported[name], value, atol=1e-5, rtol=0, msg=name)
    assert abs(stats["resumed"]["loss"] - expected_second["loss"]) < 1e-6
    assert (tmp_path / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors").is_file()
