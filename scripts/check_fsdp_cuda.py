"""The trainer on CUDA with NCCL: the plain actor, then one FSDP2 step on every visible GPU.

No vLLM and no torchrun: this process is rank 0 and spawns the other ranks itself, as
`sdp train train.world_size=N train.device=cuda` does. With one GPU it runs FSDP2 with one rank
(bfloat16 compute through MixedPrecisionPolicy goes through the sharded actor even then).
Prints, per phase: the loss, the gradient norm, the step time, and how far the bfloat16 and the
float32 FSDP2 steps land from the plain float32 step; then exports the full weights and writes
and reads a torch.distributed.checkpoint.

    python scripts/check_fsdp_cuda.py [--world-size N] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdp_cli.config import load_config
from sdp_cli.config.schema import SdpConfig
from sdp_cli.launcher.process import free_port
from sdp_cli.model import ensure_model_dir
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.checkpoint import load_checkpoint, save_checkpoint
from sdp_cli.trainer.fsdp import trainer_actor


def groups_scored_by(actor: Actor) -> list[RolloutGroup]:
    prompts = [[1, 5, 6, 7, 45], [1, 8, 45], [1, 5, 5, 5, 5, 5, 45], [1, 9, 9, 45]]
    outputs = [[9, 9, 2], [10, 11, 12, 13, 14, 15, 2], [7], [20, 21, 22, 23, 2]]
    groups = []
    for g, prompt in enumerate(prompts):
        outs = [outputs[(g + k) % len(outputs)] for k in range(4)]
        behav = actor.score([prompt] * len(outs), outs)
        samples = [
            Trajectory(prompt, out, lp, [0] * len(out), reward=float((g + k) % 2))
            for k, (out, lp) in enumerate(zip(outs, behav, strict=True))
        ]
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def report(name: str, stats: dict[str, float], seconds: float) -> None:
    print(
        f"{name}: loss {stats['loss']:.6f}, grad_norm {stats['grad_norm']:.6f}, "
        f"{stats['n_micro_batches']:.0f} micro-batches, step {seconds * 1000:.1f} ms",
        flush=True,
    )


def max_difference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(
        float((weights[k].float() - v.float().cpu()).abs().max()) for k, v in reference.items()
    )


def sharded_step(
    cfg: SdpConfig, model_dir: Path, groups: list[RolloutGroup], work: Path, name: str
) -> dict[str, torch.Tensor]:
    """One FSDP2 step on `groups`; exports and checkpoints it; returns the exported weights."""
    cfg = replace(cfg, train=replace(cfg.train, master_port=free_port()))
    work = work / name.replace(", ", "-").replace(" ", "-")
    with trainer_actor(cfg, model_dir, work / "logs") as actor:
        started = time.perf_counter()
        stats = actor.train_step(groups, 0)
        torch.cuda.synchronize()
        report(name, stats, time.perf_counter() - started)
        exported = actor.export_weights(work / "weights", 1)
        state = TrainState(step=1, version=1, data_position=0)
        path = save_checkpoint(
            work, actor.model, actor.optimizer, state, write_tensors=actor.save_tensors
        )
        load_checkpoint(path, actor.model, actor.optimizer, read_tensors=actor.load_tensors)
        print(f"{name}: exported {exported}, checkpoint {path} written and read back", flush=True)
    return load_file(exported / "model.safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=0, help="default: every visible GPU")
    parser.add_argument("--model", default=None, help="model directory (default: built-in tiny)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 1
    world_size = args.world_size or torch.cuda.device_count()
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPUs, world_size {world_size}")
    overrides = ["train.device=cuda", "train.prox_mode=recompute", f"train.world_size={world_size}"]
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = load_config(None, overrides)
    model_dir = ensure_model_dir(cfg.model)

    plain = Actor(model_dir, replace(cfg.train, dtype="float32"))
    groups = groups_scored_by(plain)
    started = time.perf_counter()
    stats = plain.train_step(groups, 0)
    torch.cuda.synchronize()
    report("plain actor, float32", stats, time.perf_counter() - started)
    reference = {k: v.detach().clone() for k, v in plain.model.state_dict().items()}
    del plain
    torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bf16 = sharded_step(cfg, model_dir, groups, work, f"fsdp2 x{world_size}, bfloat16")
        diff = max_difference(bf16, reference)
        print(f"bfloat16 weights vs plain float32: max |diff| {diff:.2e}")
        if world_size > 1:
            fp32_cfg = replace(cfg, train=replace(cfg.train, dtype="float32"))
            fp32 = sharded_step(fp32_cfg, model_dir, groups, work, f"fsdp2 x{world_size}, float32")
            diff = max_difference(fp32, reference)
            print(f"float32 weights vs plain float32: max |diff| {diff:.2e}")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
