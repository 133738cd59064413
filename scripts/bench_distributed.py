"""Trainer samples/s with train.world_size=1 (the plain actor) and 2 (FSDP2 over gloo) on CPU.

No servers: every step trains the same synthetic batch (rollout.batch_size groups of
rollout.n_samples completions shaped like the built-in task's), so the numbers are the
trainer's alone. Prints the median step time over --steps steps after one warm-up step, per
world size, and the ratio. On a 2-core machine two ranks of one torch thread each use both
cores; expect little or no speed-up at the tiny model's size, where the step is dominated by
per-layer collectives rather than compute.

    python scripts/bench_distributed.py [--steps 10] [--world-sizes 1,2] [overrides...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sdp_cli.config import load_config
from sdp_cli.config.schema import SdpConfig
from sdp_cli.launcher.process import free_port
from sdp_cli.model import ensure_model_dir
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.fsdp import trainer_actor


def synthetic_groups(cfg: SdpConfig, seed: int = 0) -> list[RolloutGroup]:
    """Prompts of 6-12 tokens and completions of up to rollout.max_new_tokens, with rewards
    that differ within a group (so every sample has an advantage and a gradient)."""
    rng = random.Random(seed)
    groups = []
    for g in range(cfg.rollout.batch_size):
        prompt = [1] + [rng.randrange(4, 40) for _ in range(rng.randrange(6, 12))]
        samples = []
        for k in range(cfg.rollout.n_samples):
            n = rng.randrange(2, cfg.rollout.max_new_tokens + 1)
            output = [rng.randrange(4, 40) for _ in range(n)]
            logprobs = [-rng.uniform(1.0, 4.0) for _ in range(n)]
            samples.append(Trajectory(prompt, output, logprobs, [0] * n, reward=float(k % 2)))
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def step_times(cfg: SdpConfig, model_dir: Path, steps: int) -> list[float]:
    groups = synthetic_groups(cfg)
    with tempfile.TemporaryDirectory() as logs, trainer_actor(cfg, model_dir, Path(logs)) as actor:
        actor.train_step(groups, 0)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            actor.train_step(groups, 0)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.batch_size=16")
    args = parser.parse_args()
    base = load_config(None, ["train.prox_mode=loglinear", *args.overrides])
    model_dir = ensure_model_dir(base.model)
    samples = base.rollout.batch_size * base.rollout.n_samples
    results: dict[int, float] = {}
    for world_size in [int(w) for w in args.world_sizes.split(",")]:
        train = replace(base.train, world_size=world_size, master_port=free_port())
        times = step_times(replace(base, train=train), model_dir, args.steps)
        median = statistics.median(times)
        results[world_size] = samples / median
        print(
            f"world_size={world_size}: median step {median * 1000:.1f} ms over {len(times)} "
            f"steps (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}), "
            f"{results[world_size]:.1f} trained samples/s",
            flush=True,
        )
    if 1 in results:
        for world_size, rate in results.items():
            if world_size != 1:
                print(f"world_size={world_size} / world_size=1: {rate / results[1]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
