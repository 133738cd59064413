"""Trained samples per second with η = 2 against η = 0 on the default config, in one run.

Both trainings share one vLLM fleet (started here, attached through its registry file), so the
only difference is the staleness bound. Prints samples/s for each, their ratio, and the share of
a step spent in the weight-update protocol.

    .venv/bin/python scripts/bench_train.py [--steps N] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from sdp_cli.config import load_config
from sdp_cli.launcher.fleet import start_servers
from sdp_cli.runner import run_training
from sdp_cli.telemetry.events import read_events


def step_numbers(run_dir: Path) -> dict[str, float]:
    steps = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "train_step"]
    # Skip the first step: it includes filling the pipeline from nothing.
    steady = steps[1:]
    wait = sum(s["wait_s"] for s in steady)
    train = sum(s["step_s"] for s in steady)
    update = sum(s["update_s"] for s in steady)
    cycle = wait + train + update
    samples = sum(s["samples"] for s in steady)
    return {
        "steps": len(steady),
        "samples_per_s": samples / cycle,
        "wait_share": wait / cycle,
        "train_share": train / cycle,
        "update_share": update / cycle,
        "mean_reward": sum(s["reward"] for s in steps) / len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="sdp-bench-train-"))
    fleet_cfg = load_config(None, [f"run.dir={work / 'fleet'}", *args.overrides])
    fleet = start_servers(fleet_cfg)
    results: dict[str, Any] = {}
    try:
        for eta in (0, 2):
            run_dir = work / f"eta{eta}"
            cfg = load_config(
                None,
                [
                    f"run.dir={run_dir}",
                    f"train.steps={args.steps}",
                    f"rollout.max_staleness={eta}",
                    f"server.registry={fleet.registry_path}",
                    "train.checkpoint_every=1000",
                    *args.overrides,
                ],
            )
            run_training(cfg, console)
            results[f"eta{eta}"] = step_numbers(run_dir)
    finally:
        fleet.stop()
    results["speedup_eta2_over_eta0"] = (
        results["eta2"]["samples_per_s"] / results["eta0"]["samples_per_s"]
    )
    print(json.dumps(results, indent=2))
    for name in ("eta0", "eta2"):
        r = results[name]
        print(
            f"{name}: {r['samples_per_s']:.2f} trained samples/s over {r['steps']} steps; "
            f"waiting {r['wait_share']:.0%}, training {r['train_share']:.0%}, "
            f"weight update {r['update_share']:.0%} of a step"
        )
    print(f"η=2 / η=0 samples/s ratio: {results['speedup_eta2_over_eta0']:.2f}")


if __name__ == "__main__":
    main()
