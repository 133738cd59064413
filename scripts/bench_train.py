"""Trained samples per second with η = 2 against η = 0 on the default config, in one run.

The trainings of one placement share one vLLM fleet (started here, attached through its registry
file), so the only difference between η = 0 and η = 2 is the staleness bound. All configurations
alternate for `--rounds` rounds and each figure is the median over the rounds, so a slow spell of
the machine hits all of them.
For each it prints trained samples/s, the split of a step into waiting for rollouts, training and
the weight update (and the update's own phases), and where the CPU went: cores kept busy, and CPU
milliseconds per trained sample in this process (trainer and rollout executor) and in the vLLM
server processes. Each configuration runs twice, on two fleets started side by side (an idle
fleet costs next to no CPU): `split`, servers and trainer on their own cores (`run.split_cpus`),
and `os`, placement left to the OS and vLLM; the ratio `sdp train` gets by default takes η = 0
from `os` and η = 2 from `split`, since it splits only when η ≥ 1. `--prox-modes
segment,loglinear` measures more than the default prox_mode.

    .venv/bin/python scripts/bench_train.py [--steps N] [--rounds R] [--prox-modes M,...]
        [--placements split,os]
        [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from sdp_cli.commands.train import run_training, with_cpu_placement
from sdp_cli.config import SdpConfig, load_config
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import RunStartedEvent, TrainStepEvent, WeightUpdateEvent
from sdp_cli.launcher.fleet import ServerFleet
from sdp_cli.model import ensure_model_dir

ETAS = (0, 2)


@dataclass(frozen=True)
class SteadySteps:
    """A run's steady steps: after the pipeline has filled, before the last step drains it."""

    steps: list[TrainStepEvent]
    updates: list[WeightUpdateEvent]
    start_ts: float
    """When the last step that filled the pipeline ended: the steady steps' start."""
    end_ts: float


def steady_steps(run_dir: Path) -> SteadySteps:
    """All but the first η + 1 steps and the last. At η the executor starts η + 1 batches at
    once, so the first η + 1 steps fill the pipeline and run slower (docs/benchmarks.md); the
    last drains it
    (with no step after it, train.overlap_reload has nothing to train during its reload).
    A long run's throughput is the steady one; real and simulated logs go through this alike."""
    events = list(read_events(run_dir / "events.jsonl"))
    started = next(e for e in events if isinstance(e, RunStartedEvent))
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    updates = [e for e in events if isinstance(e, WeightUpdateEvent)]
    fill = started.max_staleness + 1
    if len(steps) < fill + 2:
        raise ValueError(
            f"{run_dir}: {len(steps)} steps leave no steady step after {fill} filling the "
            f"pipeline and one draining it"
        )
    return SteadySteps(
        steps[fill:-1], updates[fill:-1], steps[fill - 1].ts or 0.0, steps[-2].ts or 0.0
    )


def steps_for(steady: int, eta: int) -> int:
    """train.steps that leave `steady` steady steps at η."""
    return steady + eta + 2


def step_numbers(run: SteadySteps) -> dict[str, float]:
    steady, updates = run.steps, run.updates
    wait = sum(s.wait_s for s in steady)
    train = sum(s.step_s for s in steady)
    update = sum(s.update_s for s in steady)
    cycle = wait + train + update
    phases: dict[str, float] = {}
    for event in updates:
        for name, seconds in event.phases.items():
            phases[name] = phases.get(name, 0.0) + seconds / len(updates)
        # The servers' own phases of the reload (vLLM's pause, load, resume...).
        for name, seconds in event.server_phases.items():
            if name.endswith("_s"):
                key = f"server_{name}"
                phases[key] = phases.get(key, 0.0) + seconds / len(updates)
    padding = [s.stats["padding_frac"] for s in steady if "padding_frac" in s.stats]
    # The whole update, reload included, whether or not the trainer waited for all of it.
    whole = statistics.fmean(e.total_s for e in updates) if updates else float("nan")
    return {
        "steps": len(steady),
        "samples_per_s": sum(s.samples for s in steady) / cycle,
        # Share of the trainer's positions that were padding (what packing could save at most).
        "padding_frac": statistics.fmean(padding) if padding else float("nan"),
        "wait_share": wait / cycle,
        "train_share": train / cycle,
        "update_share": update / cycle,
        "train_step_s": train / len(steady),
        "update_total_ms": whole * 1000,
        **{f"update_{name}_ms": seconds * 1000 for name, seconds in phases.items()},
    }


class CpuSampler:
    """Samples, every `interval` seconds, the CPU time of this process (trainer and rollout
    executor) and of every process it started (the vLLM servers), to account for the CPU of the
    steady steps alone, without start-up and shut-down."""

    # Coarse on purpose: a fine interval slows the train step and the reload it measures
    # (docs/benchmarks.md); the steady steps span a minute or more.
    def __init__(self, interval: float = 0.5) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            own = me.cpu_times()
            servers = 0.0
            for child in me.children(recursive=True):
                try:
                    times = child.cpu_times()
                except psutil.Error:
                    continue
                servers += times.user + times.system
            self.samples.append((time.time(), own.user + own.system, servers))
            self._stop.wait(self._interval)

    def between(self, start: float, end: float) -> tuple[float, float, float]:
        """(wall seconds, own CPU seconds, servers' CPU seconds) between the samples nearest
        to `start` and `end`."""
        first = min(self.samples, key=lambda sample: abs(sample[0] - start))
        last = min(self.samples, key=lambda sample: abs(sample[0] - end))
        return last[0] - first[0], last[1] - first[1], last[2] - first[2]


def train_once(
    run_dir: Path, overrides: list[str], console: Console, conf: Path | None = None
) -> dict[str, float]:
    """One `sdp train` in this process (on `conf` when given): its steady-step figures and
    where the CPU went."""
    cfg = load_config(None if conf is None else str(conf), [f"run.dir={run_dir}", *overrides])
    with CpuSampler() as cpu:
        run_training(cfg, console)
    steady = steady_steps(run_dir)
    wall, own, servers = cpu.between(steady.start_ts, steady.end_ts)
    trained = sum(s.samples for s in steady.steps)
    return {
        **step_numbers(steady),
        "cores_busy": (own + servers) / wall,
        "trainer_cpu_ms_per_sample": own / trained * 1000,
        "vllm_cpu_ms_per_sample": servers / trained * 1000,
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def describe(name: str, r: dict[str, float]) -> str:
    phases = ", ".join(
        f"{key[len('update_') : -len('_ms')]} {value:.0f}"
        for key, value in r.items()
        if key.startswith("update_") and key.endswith("_ms")
    )
    return (
        f"{name}: {r['samples_per_s']:.1f} trained samples/s; waiting {r['wait_share']:.0%}, "
        f"training {r['train_share']:.0%}, weight update {r['update_share']:.0%} of a step "
        f"(ms: {phases}); {r['cores_busy']:.2f} cores busy, CPU per trained sample: "
        f"trainer {r['trainer_cpu_ms_per_sample']:.1f} ms, "
        f"vLLM {r['vllm_cpu_ms_per_sample']:.1f} ms; trainer positions padding "
        f"{r['padding_frac']:.1%}"
    )


def replace_eta(cfg: SdpConfig, eta: int) -> SdpConfig:
    return replace(cfg, rollout=replace(cfg.rollout, max_staleness=eta))


def core_list(cores: list[int]) -> str:
    return "[" + ",".join(str(core) for core in cores) + "]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prox-modes", default="segment")
    parser.add_argument(
        "--placements",
        default="split,os",
        help="split: servers and trainer on their own cores (run.split_cpus); os: left to the "
        "OS and vLLM. With both, the default placement of `sdp train` (split for η ≥ 1 only) "
        "is reported too",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.prox_modes.split(",") if mode.strip()]
    console = Console(stderr=True, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="sdp-bench-train-"))
    chosen = [name.strip() for name in args.placements.split(",") if name.strip()]
    base = load_config(None, [f"run.dir={work / 'fleet'}", *args.overrides])
    # One fleet per placement, started the way `sdp train` would start it; an idle fleet
    # costs next to no CPU, so the two do not disturb each other.
    configs = {"split": with_cpu_placement(replace_eta(base, 2)), "os": base}
    fleets: dict[str, ServerFleet] = {}
    try:
        for placement in chosen:
            cfg = configs[placement]
            cfg = replace(cfg, run=replace(cfg.run, dir=str(work / f"fleet-{placement}")))
            print(
                f"{placement}: servers on cores {cfg.server.cpu_cores or 'any'}, "
                f"trainer on {cfg.train.cpu_cores or 'any'}",
                flush=True,
            )
            fleet = ServerFleet(cfg.server, ensure_model_dir(cfg.model), Path(cfg.run.dir))
            fleet.start()
            fleets[placement] = fleet
        runs: dict[str, list[dict[str, float]]] = {}
        for round_index in range(args.rounds):
            for placement in chosen:
                trainer_cores = core_list(configs[placement].train.cpu_cores)
                for mode in modes:
                    for eta in ETAS:
                        name = f"{placement}/{mode}/eta{eta}"
                        overrides = [
                            f"train.steps={args.steps}",
                            f"train.prox_mode={mode}",
                            f"rollout.max_staleness={eta}",
                            f"server.registry={fleets[placement].registry_path}",
                            "train.checkpoint_every=1000",
                            f"train.cpu_cores={trainer_cores}",
                            *args.overrides,
                        ]
                        run_dir = work / f"{placement}-{mode}-eta{eta}-round{round_index}"
                        result = train_once(run_dir, overrides, console)
                        runs.setdefault(name, []).append(result)
    finally:
        for fleet in fleets.values():
            fleet.stop()
    results: dict[str, Any] = {name: medians(found) for name, found in runs.items()}
    for placement in chosen:
        for mode in modes:
            both = [results[f"{placement}/{mode}/eta{eta}"]["samples_per_s"] for eta in ETAS]
            results[f"{placement}/{mode}/ratio_eta2_over_eta0"] = both[1] / both[0]
    if {"split", "os"} <= set(chosen):
        for mode in modes:
            # What `sdp train` does by default: η = 0 on any core, η = 2 split.
            results[f"default/{mode}/ratio_eta2_over_eta0"] = (
                results[f"split/{mode}/eta2"]["samples_per_s"]
                / results[f"os/{mode}/eta0"]["samples_per_s"]
            )
    print(json.dumps(results, indent=2))
    print(f"medians of {args.rounds} alternating rounds, {args.steps} steps each:")
    for placement in chosen:
        for mode in modes:
            for eta in ETAS:
                print(
                    describe(
                        f"{placement}/{mode}/eta{eta}", results[f"{placement}/{mode}/eta{eta}"]
                    )
                )
            ratio = results[f"{placement}/{mode}/ratio_eta2_over_eta0"]
            print(f"{placement}, prox_mode={mode}: η=2 / η=0 trained samples/s ratio {ratio:.2f}")
    for mode in modes:
        if f"default/{mode}/ratio_eta2_over_eta0" in results:
            ratio = results[f"default/{mode}/ratio_eta2_over_eta0"]
            print(
                f"as `sdp train` places them (η=0 on any core, η=2 split), prox_mode={mode}: "
                f"η=2 / η=0 trained samples/s ratio {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
