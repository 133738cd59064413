"""Does the pipeline hide a slow tool in a real run? The tiny model's multi-turn example
(`conf/examples/tiny-multiturn.yaml`: feedback on reverse, 2-3 model turns per episode) with
every environment step delayed by 0, 0.5 or 2 s, at η = 0 and η = 2, on a real vLLM server.

The delay runs in the environment's worker thread (`time.sleep`), as a slow tool would. Each run
is `sdp train` in its own process with `task.env=bench_episode_latency:DelayedFeedback`; trained
samples per second are the steps' samples over the training loop's seconds (from `events.jsonl`:
the sum of each step's wait, train and update time), so server start-up does not count. It prints
one row per run and, last, one JSON object with the ratio of 2 s to 0 s for each η.

    .venv/bin/python scripts/bench_episode_latency.py [--steps 12] [--delays 0,0.5,2] [--etas 0,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import TrainStepEvent

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "examples" / "tiny-multiturn.yaml"
DELAY_ENV = "SDP_BENCH_TOOL_DELAY_S"
FEEDBACK = "no, try again."
ATTEMPTS = 3


class DelayedFeedback:
    """The feedback environment on `reverse` (exact answer: reward 1), every step slowed by
    $SDP_BENCH_TOOL_DELAY_S seconds."""

    def __init__(self) -> None:
        self.delay_s = float(os.environ.get(DELAY_ENV, "0"))
        self.target = ""
        self.attempts = 0

    def reset(self, instance: Mapping[str, Any]) -> list[dict[str, str]]:
        self.target = str(instance["target"])
        self.attempts = 0
        return [{"role": "user", "content": str(instance["question"])}]

    def step(self, model_message: str) -> tuple[list[dict[str, str]], bool, float]:
        time.sleep(self.delay_s)
        self.attempts += 1
        correct = model_message.strip() == self.target
        if correct or self.attempts >= ATTEMPTS:
            return [], True, float(correct)
        return [{"role": "user", "content": FEEDBACK}], False, 0.0


def run(out: Path, delay: float, eta: int, steps: int) -> dict[str, Any]:
    run_dir = out / f"delay{delay}-eta{eta}"
    command = [
        sys.executable, "-m", "sdp_cli", "train", f"conf={EXAMPLE}", f"run.dir={run_dir}",
        "task.name=reverse", "task.env=bench_episode_latency:DelayedFeedback",
        f"rollout.max_staleness={eta}", f"train.steps={steps}", "eval.every=0",
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, DELAY_ENV: str(delay), "PYTHONPATH": path}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    events = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, TrainStepEvent)]
    loop_s = sum(e.wait_s + e.step_s + e.update_s for e in events)
    samples = sum(e.samples for e in events)
    return {"delay_s": delay, "eta": eta, "steps": len(events), "loop_s": round(loop_s, 2),
            "samples_per_s": round(samples / loop_s, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--delays", default="0,0.5,2")
    parser.add_argument("--etas", default="0,2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-episode-latency"))
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    rows = []
    for eta in (int(e) for e in args.etas.split(",")):
        for delay in delays:
            row = run(args.out, delay, eta, args.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratios = {}
    for eta in {r["eta"] for r in rows}:
        rate = {r["delay_s"]: r["samples_per_s"] for r in rows if r["eta"] == eta}
        if min(delays) < max(delays) and min(delays) in rate and max(delays) in rate:
            ratios[f"eta={eta}"] = round(rate[max(delays)] / rate[min(delays)], 3)
    print(json.dumps({"runs": rows, "ratio_max_delay_to_min": ratios}))


if __name__ == "__main__":
    main()
