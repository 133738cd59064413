"""Does RL raise held-out accuracy? SmolLM2 on reasoning-gym chain_sum (single-turn, long
completions, or multi-turn episodes: `--workload`), greedy evaluation on held-out prompts before
training and every few steps, for a wall-time budget per run.

Each run is `sdp train conf=<workload's example>` in its own process with `eval.every`,
`eval.n_prompts` held-out prompts at `eval.temperature=0`, and a large `train.steps`; when the
budget is spent the run gets SIGINT (it stops cleanly and keeps its last checkpoint). The curve
is read back from each run's `events.jsonl` (`eval` events): accuracy by step and by wall time
since the process started, plus reward, KL and entropy per step, and for episodes the model
turns and tool calls per episode.

Variants run one after another, each with the same budget, per seed:
- `--compare KEY=A,B[,C]`: one sdp run per value of the config key (any `sdp train` override,
  e.g. `--compare rollout.filter_groups=none,same_reward`);
- `--peer trl`: TRL's GRPOTrainer on the same model, prompts, chat template, reward, held-out
  prompts and greedy evaluation (scripts/bench_learning_trl.py; needs the `bench` extra).

It prints one table per run, the curves side by side (accuracy by step, then at each minute),
a summary per variant (completions/s, accuracy at equal wall time, time to +10 points) and, last,
one JSON object with all of it.

    .venv/bin/python scripts/bench_learning.py [--workload chain_sum|long|feedback|tool_calc]
        [--minutes 45]
        [--seeds 0,1] [--eval-prompts 128] [--eval-every 10] [--eval-fraction 0.7]
        [--compare KEY=A,B] [--peer trl] [--trl-generation transformers] [--out DIR]
        [extra overrides...]

chain_sum with two one-digit terms has only 200 distinct questions, so 128 held-out prompts need
`task.eval_fraction` ≥ 0.64 (`--eval-fraction`, default 0.7): training then sees the other 60
questions, drawn again and again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import EvalEvent, RolloutFinishedEvent, TrainStepEvent

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "chain_sum": ROOT / "conf" / "examples" / "smollm2-chain-sum.yaml",
    "long": ROOT / "conf" / "examples" / "smollm2-long.yaml",
    # Multi-turn episodes: up to 3 answers to a chain_sum question, with feedback after each
    # wrong one.
    "feedback": ROOT / "conf" / "examples" / "smollm2-feedback.yaml",
    "tool_calc": ROOT / "conf" / "examples" / "smollm2-tool-calc.yaml",
}
EXAMPLE = WORKLOADS["chain_sum"]
PEERS = ("trl",)
TRL_SCRIPT = ROOT / "scripts" / "bench_learning_trl.py"
# The points a run must gain for "time to +10 points".
TARGET_POINTS = 10.0
# How long a peer may run past its deadline to finish its step (it stops itself at a step end).
PEER_GRACE_S = 300.0


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: an sdp run with extra overrides, or a peer."""

    name: str
    overrides: list[str] = field(default_factory=list)
    peer: str | None = None


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` → ['a', 'b', '[1,2]']: commas inside brackets or braces stay."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_compare(text: str) -> tuple[str, list[str]]:
    """`KEY=A,B` → (KEY, [A, B]); an argparse error (exit 2) unless there are two or more
    non-empty values of a dotted key."""
    key, sep, rest = text.partition("=")
    values = split_values(rest) if sep else []
    if not key.strip() or not sep or len(values) < 2 or any(not v for v in values):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not KEY=A,B: give a config key and two or more values, e.g. "
            "--compare rollout.filter_groups=none,same_reward"
        )
    return key.strip(), values


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of integers like 0,1") from None
    return seeds


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="chain_sum")
    parser.add_argument("--minutes", type=positive, default=45.0, help="wall time per run")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1])
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-fraction", type=float, default=0.7)
    parser.add_argument("--compare", type=parse_compare, default=None, metavar="KEY=A,B")
    parser.add_argument("--peer", choices=PEERS, default=None)
    parser.add_argument(
        "--trl-generation",
        choices=("transformers", "vllm-colocate"),
        default="transformers",
        help="the peer's generation: TRL's own, or its colocated vLLM",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-learning")
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, extra


def variants(args: argparse.Namespace) -> list[Variant]:
    """The runs per seed, in the order they run."""
    if args.compare is None:
        runs = [Variant("sdp")]
    else:
        key, values = args.compare
        runs = [Variant(f"{key}={value}", [f"{key}={value}"]) for value in values]
    if args.peer is not None:
        runs.append(Variant(args.peer, peer=args.peer))
    return runs


def slug(name: str) -> str:
    """A variant's directory name: Hydra reads `=`, `,` and brackets in `run.dir` as syntax."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def shared_overrides(seed: int, args: argparse.Namespace) -> list[str]:
    """What every run of a seed gets, sdp or peer: the seeds and the evaluation."""
    return [
        f"run.seed={seed}",
        f"task.seed={seed}",
        f"eval.n_prompts={args.eval_prompts}",
        "eval.temperature=0",
        f"task.eval_fraction={args.eval_fraction}",
    ]


def run_command(
    variant: Variant, run_dir: Path, seed: int, args: argparse.Namespace, extra: list[str]
) -> list[str]:
    conf = WORKLOADS[args.workload]
    common = [*shared_overrides(seed, args), *extra, *variant.overrides]
    if variant.peer == "trl":
        deadline = time.time() + args.minutes * 60
        return [
            sys.executable,
            str(TRL_SCRIPT),
            f"--conf={conf}",
            f"--deadline={deadline}",
            f"--out={run_dir}",
            f"--eval-every={args.eval_every}",
            f"--generation={args.trl_generation}",
            *common,
        ]
    return [
        sys.executable,
        "-m",
        "sdp_cli",
        "train",
        f"conf={conf}",
        f"run.dir={run_dir}",
        "run.overwrite=true",
        "train.steps=100000",
        f"eval.every={args.eval_every}",
        *common,
    ]


def train_for(command: list[str], minutes: float, log: Path, grace_s: float = 0.0) -> int | None:
    """Run `command` for `minutes` (plus `grace_s` for a peer that stops itself), then
    SIGINT; its output goes to `log`."""
    print(" ".join(command[1:]), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=minutes * 60 + grace_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return process.returncode


def curve(run_dir: Path, launched: float | None = None) -> dict[str, Any]:
    """The run's accuracy curve (with `t_s`, seconds since `launched`, when given) and its
    training figures."""
    log = run_dir / "events.jsonl"
    # A run that failed before its log (a config error): an empty curve, its log says why.
    events = list(read_events(log)) if log.is_file() else []
    evals = [e for e in events if isinstance(e, EvalEvent)]
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    points = [
        {
            "step": e.step,
            "accuracy": e.accuracy,
            "mean_reward": e.mean_reward,
            "t_s": None if launched is None or e.ts is None else e.ts - launched,
        }
        for e in evals
    ]
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
        **episode_figures([e for e in events if isinstance(e, RolloutFinishedEvent)]),
        "kl_last": steps[-1].kl if steps else None,
        "entropy_last": steps[-1].entropy if steps else None,
        "completions_per_s": completions_per_s(steps, evals),
        "time_to_target_s": time_to_gain(points, TARGET_POINTS),
        "steps_per_minute": None,
    }


def episode_figures(rollouts: list[RolloutFinishedEvent]) -> dict[str, Any]:
    """Multi-turn workloads: model turns and tool calls per episode, over the first and the last
    tenth of the rollout groups that finished, and by the version the groups started at; empty
    for single-turn runs."""
    episodes = [r for r in rollouts if r.episode_turns]
    if not episodes:
        return {}
    tenth = max(1, len(episodes) // 10)

    def per_episode(field: str, groups: list[RolloutFinishedEvent]) -> float | None:
        counts = [c for g in groups for c in (getattr(g, field) or [])]
        return sum(counts) / len(counts) if counts else None

    versions = sorted({g.head_version for g in episodes if g.head_version is not None})
    by_version = {v: [g for g in episodes if g.head_version == v] for v in versions}
    return {
        "turns_first_tenth": per_episode("episode_turns", episodes[:tenth]),
        "turns_last_tenth": per_episode("episode_turns", episodes[-tenth:]),
        "tool_calls_first_tenth": per_episode("episode_tool_calls", episodes[:tenth]),
        "tool_calls_last_tenth": per_episode("episode_tool_calls", episodes[-tenth:]),
        "turns_by_version": {v: per_episode("episode_turns", g) for v, g in by_version.items()},
        "tool_calls_by_version": {
            v: per_episode("episode_tool_calls", g) for v, g in by_version.items()
        },
    }


def completions_per_s(steps: list[TrainStepEvent], evals: list[EvalEvent]) -> float | None:
    """Completions trained per second between the first and the last step's end, less the
    evaluations in between: the training rate, without start-up or evaluation."""
    stamped = [s for s in steps if s.ts is not None]
    if len(stamped) < 2:
        return None
    first, last = stamped[0].ts, stamped[-1].ts
    assert first is not None and last is not None
    evaluating = sum(e.seconds for e in evals if e.ts is not None and first < e.ts <= last)
    seconds = last - first - evaluating
    completions = sum(s.samples for s in stamped[1:])
    return completions / seconds if seconds > 0 else None


def time_to_gain(points: list[dict[str, Any]], gain_points: float) -> float | None:
    """Seconds from launch to the first evaluation `gain_points` above the first one."""
    if not points:
        return None
    target = points[0]["accuracy"] + gain_points / 100
    return next(
        (p["t_s"] for p in points[1:] if p["accuracy"] >= target - 1e-9 and p["t_s"] is not None),
        None,
    )


def accuracy_at(points: list[dict[str, Any]], seconds: float) -> float | None:
    """The accuracy of the last evaluation finished by `seconds` after launch."""
    done = [p for p in points if p["t_s"] is not None and p["t_s"] <= seconds]
    return done[-1]["accuracy"] if done else None


def side_by_side_steps(curves: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per evaluated step of any variant: {"step": s, name: accuracy or None}."""
    steps = sorted({p["step"] for points in curves.values() for p in points})
    by_step = {name: {p["step"]: p["accuracy"] for p in points} for name, points in curves.items()}
    return [{"step": s, **{name: by_step[name].get(s) for name in curves}} for s in steps]


def side_by_side_minutes(
    curves: dict[str, list[dict[str, Any]]], minutes: float
) -> list[dict[str, Any]]:
    """One row per whole minute of the budget: each variant's last accuracy by then."""
    return [
        {"minute": m, **{name: accuracy_at(points, 60.0 * m) for name, points in curves.items()}}
        for m in range(1, int(minutes) + 1)
    ]


def equal_time_accuracy(
    curves: dict[str, list[dict[str, Any]]], budget_s: float
) -> tuple[float, dict[str, float | None]]:
    """Each variant's accuracy at the end of the shared budget: its last evaluation finished
    within it (a peer that runs past the deadline to end its step gains nothing by that)."""
    return budget_s, {name: accuracy_at(points, budget_s) for name, points in curves.items()}


def render_table(rows: list[dict[str, Any]], first: str) -> str:
    names = [k for k in rows[0] if k != first] if rows else []
    width = max([12, *(len(n) + 1 for n in names)])
    lines = [f"{first:>7}" + "".join(f"{n:>{width}}" for n in names)]
    for row in rows:
        cells = "".join(
            f"{'–' if row[n] is None else format(row[n], '.3f'):>{width}}" for n in names
        )
        lines.append(f"{row[first]:>7}{cells}")
    return "\n".join(lines)


def summarize(
    results: dict[str, dict[str, dict[str, Any]]], budget_s: float, minutes: float
) -> dict[str, Any]:
    """Per seed: the curves side by side and accuracy at equal wall time; per variant:
    the figures averaged over seeds."""
    by_seed: dict[str, Any] = {}
    seeds = sorted({seed for runs in results.values() for seed in runs})
    for seed in seeds:
        curves = {name: runs[seed]["curve"] for name, runs in results.items() if seed in runs}
        at, accuracies = equal_time_accuracy(curves, budget_s)
        by_seed[seed] = {
            "by_step": side_by_side_steps(curves),
            "by_minute": side_by_side_minutes(curves, minutes),
            "equal_time_s": at,
            "accuracy_at_equal_time": accuracies,
        }
    per_variant = {
        name: {
            key: _mean([run[key] for run in runs.values()])
            for key in ("before", "after", "gain_points", "completions_per_s", "time_to_target_s")
        }
        | {"reached_target": all(r["time_to_target_s"] is not None for r in runs.values())}
        for name, runs in results.items()
    }
    return {"by_seed": by_seed, "per_variant": per_variant}


def print_report(summary: dict[str, Any]) -> None:
    for seed, sides in summary["by_seed"].items():
        print(f"\nseed {seed}: held-out accuracy by step")
        print(render_table(sides["by_step"], "step"))
        print(f"seed {seed}: held-out accuracy at each minute since launch")
        print(render_table(sides["by_minute"], "minute"))
        at = sides["equal_time_s"]
        equal = ", ".join(f"{n} {_fmt(a)}" for n, a in sides["accuracy_at_equal_time"].items())
        print(f"seed {seed}: at equal wall time ({at / 60:.1f} min): {equal}")
    print("\nper variant (mean over seeds)")
    for name, row in summary["per_variant"].items():
        target = row["time_to_target_s"]
        reach = f"{target / 60:.1f} min" if target is not None else "not reached"
        print(
            f"  {name}: before {_fmt(row['before'])} after {_fmt(row['after'])} "
            f"completions/s {_fmt(row['completions_per_s'])} +{TARGET_POINTS:g} points: {reach}"
        )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def main() -> None:
    args, extra = parse_args()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for seed in args.seeds:
        for variant in variants(args):
            run_dir = args.out / slug(variant.name) / f"seed-{seed}"
            command = run_command(variant, run_dir, seed, args, extra)
            launched = time.time()
            grace = PEER_GRACE_S if variant.peer else 0.0
            code = train_for(command, args.minutes, run_dir.parent / f"seed-{seed}.log", grace)
            wall_s = time.time() - launched
            result = curve(run_dir, launched)
            result["exit_code"] = code
            result["wall_s"] = wall_s
            result["steps_per_minute"] = result["steps"] / (wall_s / 60) if wall_s else None
            results.setdefault(variant.name, {})[str(seed)] = result
            print(
                f"{variant.name} seed {seed}: exit {code}, {result['steps']} steps in "
                f"{wall_s / 60:.1f} min"
            )
            for point in result["curve"]:
                print(f"  step {point['step']:>5}  accuracy {point['accuracy']:.3f}")
            if "turns_first_tenth" in result:
                print(
                    "  per episode, first tenth of the rollouts → last: model turns "
                    f"{_fmt(result['turns_first_tenth'])} → {_fmt(result['turns_last_tenth'])}, "
                    f"tool calls {_fmt(result['tool_calls_first_tenth'])} → "
                    f"{_fmt(result['tool_calls_last_tenth'])}"
                )
    summary = summarize(results, args.minutes * 60, args.minutes)
    print_report(summary)
    gains = [r["gain_points"] for runs in results.values() for r in runs.values()]
    print(
        json.dumps(
            {
                "workload": args.workload,
                "minutes": args.minutes,
                "variants": results,
                **summary,
                "target_points": TARGET_POINTS,
                "reached": bool(gains) and all(g is not None and g >= TARGET_POINTS for g in gains),
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
