"""Weight sync, in one run with alternating rounds: the update pause with
`train.update_mode=abort` against `keep` (and full weights against a LoRA adapter), trained
samples/s at η = 2 for each, and the trainer's step time and peak memory.

Each configuration is one `sdp train` process (so its peak resident memory, VmHWM, is the
trainer's and the rollout executor's alone); full-weight runs attach to one vLLM fleet started
here (`server.registry`), LoRA runs start their own servers (the launcher enables LoRA on them
when `train.lora.rank > 0`). Configurations alternate round by round and each figure is the
median over the rounds, so a slow spell of the shared machine hits all of them alike.

Figures per configuration (from each run's events.jsonl, steady steps only: after the first
η + 1 that fill the pipeline, before the last):

- `update_pause_s`: "pause per update", the seconds the servers generated nothing
  (`weight_update.generation_pause_s`; docs/design.md, Weight-update protocol), the median
  over the run's updates;
- `update_total_s`: the whole update, median;
- `samples_per_s`: trained samples per second of the steady steps (wait + step + update);
- `train_step_s`: the median trainer step;
- `peak_rss_gb`: the `sdp train` process's peak resident memory.

LoRA rounds (both modes; in keep mode the requests in flight finish on the adapter they named)
run when the config has `train.lora.rank` (`--lora-rank`, 0 skips them); without it the JSON
says why they were left out.

    flock /tmp/sdp-vllm.lock .venv/bin/python scripts/bench_weight_sync.py [--steps 6]
        [--rounds 2] [--lora-rank 8] [sdp train overrides...]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sdp_cli.config import load_config
from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import RunStartedEvent, TrainStepEvent, WeightUpdateEvent
from sdp_cli.launcher.fleet import ServerFleet
from sdp_cli.model import ensure_model_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "examples" / "smollm2-chain-sum.yaml"
MODES = ("abort", "keep")
# Long enough that completions are still generating when an update comes, which is where
# the two modes differ (at the example's 16 tokens the buffer is full before each update).
DEFAULT_OVERRIDES = ("rollout.max_staleness=2", "rollout.max_new_tokens=32")


def lora_supported(conf: Path, rank: int) -> str | None:
    """None if the config takes `train.lora.rank=rank`, else why not."""
    if rank <= 0:
        return "--lora-rank 0"
    try:
        load_config(str(conf), [f"train.lora.rank={rank}"])
    except SdpError as exc:
        return f"this checkout has no train.lora.rank ({type(exc).__name__})"
    return None


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def train_process(conf: Path, run_dir: Path, overrides: list[str]) -> int:
    """Run `sdp train` to the end; returns its peak resident memory in bytes."""
    command = [
        sys.executable,
        "-m",
        "sdp_cli",
        "train",
        f"conf={conf}",
        f"run.dir={run_dir}",
        *overrides,
    ]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    peak = 0
    while process.poll() is None:
        peak = max(peak, peak_rss_bytes(process.pid))
        time.sleep(0.5)
    log.close()
    if process.returncode != 0:
        raise RuntimeError(f"sdp train failed ({process.returncode}): see {log.name}")
    return peak


def run_figures(run_dir: Path, peak: int) -> dict[str, float]:
    """The figures of one finished run, from its event log."""
    events = list(read_events(run_dir / "events.jsonl"))
    started = next(e for e in events if isinstance(e, RunStartedEvent))
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    updates = [e for e in events if isinstance(e, WeightUpdateEvent)]
    fill = started.max_staleness + 1
    steady = steps[fill:-1] or steps
    cycle = sum(s.wait_s + s.step_s + s.update_s for s in steady)
    pauses = [u.generation_pause_s for u in updates if u.generation_pause_s is not None]
    return {
        "update_pause_s": statistics.median(pauses) if pauses else float("nan"),
        "update_total_s": statistics.median(u.total_s for u in updates),
        "samples_per_s": sum(s.samples for s in steady) / cycle,
        "train_step_s": statistics.median(s.step_s for s in steady),
        "peak_rss_gb": peak / 2**30,
        "steady_steps": len(steady),
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def configurations(lora_rank: int, lora_missing: str | None) -> dict[str, list[str]]:
    """Full weights and, where the config has it, a LoRA adapter, each in both modes."""
    configs = {f"full/{mode}": [f"train.update_mode={mode}"] for mode in MODES}
    if lora_missing is None:
        for mode in MODES:
            configs[f"lora/{mode}"] = [f"train.update_mode={mode}", f"train.lora.rank={lora_rank}"]
    return configs


def summary(results: dict[str, dict[str, float]], meta: dict[str, Any]) -> dict[str, Any]:
    def pick(key: str) -> dict[str, float]:
        return {name: round(r[key], 4) for name, r in results.items()}

    return {
        **meta,
        "update_pause_s": pick("update_pause_s"),
        "update_total_s": pick("update_total_s"),
        "samples_per_s_eta2": pick("samples_per_s"),
        "train_step_s": pick("train_step_s"),
        "peak_rss_gb": pick("peak_rss_gb"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--conf", type=Path, default=EXAMPLE)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [*DEFAULT_OVERRIDES, f"train.steps={args.steps}", *args.overrides]
    lora_missing = lora_supported(args.conf, args.lora_rank)
    configs = configurations(args.lora_rank, lora_missing)
    work = Path(tempfile.mkdtemp(prefix="sdp-bench-weight-sync-"))
    base = load_config(str(args.conf), [f"run.dir={work / 'fleet'}", *overrides])
    fleet = ServerFleet(base.server, ensure_model_dir(base.model), Path(base.run.dir))
    fleet.start()
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for round_index in range(args.rounds):
            for name, extra in configs.items():
                attach = (
                    [] if name.startswith("lora/") else [f"server.registry={fleet.registry_path}"]
                )
                run_dir = work / f"{name.replace('/', '-')}-round{round_index}"
                peak = train_process(args.conf, run_dir, [*overrides, *attach, *extra])
                figures = run_figures(run_dir, peak)
                runs.setdefault(name, []).append(figures)
                print(f"round {round_index} {name}: {json.dumps(figures)}", flush=True)
    finally:
        fleet.stop()
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "conf": str(args.conf.relative_to(ROOT) if args.conf.is_relative_to(ROOT) else args.conf),
        "overrides": overrides,
        "rounds": args.rounds,
        "lora": "measured" if lora_missing is None else f"left out: {lora_missing}",
    }
    print(json.dumps(summary({name: medians(r) for name, r in runs.items()}, meta)))


if __name__ == "__main__":
    main()
