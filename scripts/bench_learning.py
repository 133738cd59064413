"""Does RL raise held-out accuracy? SmolLM2 on reasoning-gym chain_sum, greedy evaluation on
held-out prompts before training and every few steps, for a wall-time budget per seed.

Each seed runs `sdp train conf=conf/examples/smollm2-chain-sum.yaml` in its own process with
`eval.every`, `eval.n_prompts` held-out prompts at `eval.temperature=0`, and a large
`train.steps`; when the budget is spent the run gets SIGINT (it stops cleanly and keeps its last
checkpoint). The curve is read back from each run's `events.jsonl` (`eval` events): accuracy by
step, plus reward, KL and entropy per step. It prints one table per seed and, last, one JSON
object: {"seeds": {seed: {"before", "after", "gain_points", "steps", "curve": [...]}}, ...}.

    .venv/bin/python scripts/bench_learning.py [--minutes 45] [--seeds 0,1] [--eval-prompts 128]
        [--eval-every 10] [--out DIR] [extra overrides...]

chain_sum with two one-digit terms has only 200 distinct questions, so 128 held-out prompts need
`task.eval_fraction` ≥ 0.64 (`--eval-fraction`, default 0.7): training then sees the other 60
questions, drawn again and again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import EvalEvent, TrainStepEvent

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "examples" / "smollm2-chain-sum.yaml"


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="wall time per seed")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-fraction", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-learning")
    return parser.parse_known_args()


def train_for(
    minutes: float, run_dir: Path, seed: int, args: argparse.Namespace, extra: list[str]
) -> tuple[int | None, float]:
    command = [
        sys.executable,
        "-m",
        "sdp_cli",
        "train",
        f"conf={EXAMPLE}",
        f"run.dir={run_dir}",
        "run.overwrite=true",
        f"run.seed={seed}",
        f"task.seed={seed}",
        "train.steps=100000",
        f"eval.every={args.eval_every}",
        f"eval.n_prompts={args.eval_prompts}",
        "eval.temperature=0",
        f"task.eval_fraction={args.eval_fraction}",
        *extra,
    ]
    print(" ".join(command[2:]), flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    return process.returncode, time.monotonic() - started


def curve(run_dir: Path) -> dict[str, Any]:
    events = list(read_events(run_dir / "events.jsonl"))
    evals = [e for e in events if isinstance(e, EvalEvent)]
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    points = [{"step": e.step, "accuracy": e.accuracy, "mean_reward": e.mean_reward} for e in evals]
    before = evals[0].accuracy if evals else None
    after = evals[-1].accuracy if evals else None
    return {
        "before": before,
        "after": after,
        "gain_points": None if before is None or after is None else 100 * (after - before),
        "steps": len(steps),
        "curve": points,
        "reward_first_10": _mean([s.reward for s in steps[:10]]),
        "reward_last_10": _mean([s.reward for s in steps[-10:]]),
        "kl_last": steps[-1].kl if steps else None,
        "entropy_last": steps[-1].entropy if steps else None,
        "steps_per_minute": None,
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def main() -> None:
    args, extra = parse_args()
    results: dict[str, Any] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = args.out / f"seed-{seed}"
        code, seconds = train_for(args.minutes, run_dir, seed, args, extra)
        result = curve(run_dir)
        result["exit_code"] = code
        result["wall_s"] = seconds
        result["steps_per_minute"] = result["steps"] / (seconds / 60) if seconds else None
        results[str(seed)] = result
        print(f"seed {seed}: exit {code}, {result['steps']} steps in {seconds / 60:.1f} min")
        for point in result["curve"]:
            print(f"  step {point['step']:>5}  accuracy {point['accuracy']:.3f}")
    gains = [r["gain_points"] for r in results.values() if r["gain_points"] is not None]
    summary = {
        "seeds": results,
        "target_points": 10,
        "reached": bool(gains) and len(gains) == len(results) and min(gains) >= 10,
        "cores": os.cpu_count(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
