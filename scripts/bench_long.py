"""Measure a long-completion `sdp train` run: generated tokens/s, the trainer's step time and
peak memory, and what each weight update's re-prefills cost the servers.

    python scripts/bench_long.py [--run-dir DIR] [sdp train overrides...]

Runs `sdp train conf=conf/examples/smollm2-long.yaml` (by default; a `conf=` argument replaces
it) and, while it runs, polls every server's vLLM `/metrics` and the trainer process's peak
resident memory (VmHWM). After each weight update every completion it aborted is prefilled again
with its prompt and its tokens so far; the servers' prompt-token counter and time-to-first-token
histogram, read over the first `--window-s` seconds after the update's end (or until the next
update starts, if sooner), give per update the prompt tokens prefilled then and the mean wait of
the requests that got their first token then (the continuations, and any fresh prompt admitted
meanwhile). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONF = REPO / "conf" / "examples" / "smollm2-long.yaml"
POLL_S = 0.25
COUNTERS = {
    "prompt": "vllm:prompt_tokens_total",
    "generated": "vllm:generation_tokens_total",
    "ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
}


@dataclass
class Sample:
    """One poll of every server's counters, summed over the servers."""

    at: float
    counters: dict[str, float]


def read_counters(text: str) -> dict[str, float]:
    """The COUNTERS of one /metrics page (summed over their label sets)."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for key, name in COUNTERS.items():
            if re.match(rf"{re.escape(name)}(\{{|\s)", line):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


def server_addresses(run_dir: Path) -> list[str]:
    try:
        servers = json.loads((run_dir / "servers.json").read_text())["servers"]
    except (OSError, ValueError, KeyError):
        return []
    return [s["address"] for s in servers if s.get("state") == "ready"]


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else None


def poll(proc: subprocess.Popen[bytes], run_dir: Path) -> tuple[list[Sample], float]:
    """Counters every POLL_S until `proc` exits; also the trainer's last VmHWM read."""
    samples: list[Sample] = []
    peak = 0.0
    with httpx.Client(timeout=2.0) as http:
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            totals = dict.fromkeys(COUNTERS, 0.0)
            addresses = server_addresses(run_dir)
            try:
                for address in addresses:
                    page = read_counters(http.get(f"{address}/metrics").text)
                    for key, value in page.items():
                        totals[key] += value
            except httpx.HTTPError:
                addresses = []
            if addresses:
                samples.append(Sample(time.time(), totals))
            time.sleep(POLL_S)
    return samples, peak


def at(samples: list[Sample], when: float) -> dict[str, float]:
    """The counters of the last poll at or before `when` (the first poll if none)."""
    chosen = samples[0]
    for sample in samples:
        if sample.at > when:
            break
        chosen = sample
    return chosen.counters


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("type") == kind]


def update_windows(run_dir: Path, window_s: float) -> list[tuple[int, float, float]]:
    """(version, the update's end, the window's end) per update: `window_s` after the update,
    or the next update's start (the run's end) if sooner."""
    updates = events(run_dir, "weight_update")
    ends = [(u["version"], u["ts"]) for u in updates]
    starts = [u["ts"] - u["total_s"] for u in updates[1:]]
    last = max(json.loads(line)["ts"] for line in (run_dir / "events.jsonl").open())
    return [
        (v, end, min(start, end + window_s))
        for (v, end), start in zip(ends, [*starts, last], strict=True)
    ]


def reprefill_costs(samples: list[Sample], run_dir: Path, window_s: float) -> list[dict]:
    rows = []
    for version, end, next_start in update_windows(run_dir, window_s):
        before, after = at(samples, end), at(samples, next_start)
        firsts = after["ttft_count"] - before["ttft_count"]
        rows.append(
            {
                "version": version,
                "prompt_tokens": after["prompt"] - before["prompt"],
                "first_tokens": firsts,
                "mean_ttft_s": round((after["ttft_sum"] - before["ttft_sum"]) / max(firsts, 1), 2),
                "window_s": round(next_start - end, 1),
            }
        )
    return rows


def summary(
    run_dir: Path, samples: list[Sample], peak_mb: float, wall_s: float, window_s: float
) -> dict:
    steps = events(run_dir, "train_step")
    restarts = [e for e in events(run_dir, "server_state") if e["state"] == "restarting"]
    finished = events(run_dir, "rollout_finished")
    first, last = samples[0], samples[-1]
    generated = last.counters["generated"] - first.counters["generated"]
    finished = [e for e in finished if e.get("n_tokens")]
    segments = [e.get("n_segments", 0) for e in finished]
    completions = sum(len(e.get("completion_tokens") or [None]) for e in finished)
    return {
        "steps": len(steps),
        "server_restarts": len(restarts),
        "wall_s": round(wall_s, 1),
        "generated_tokens_per_s": round(generated / (last.at - first.at), 1),
        "trainer_step_s_median": round(statistics.median(e["step_s"] for e in steps), 2),
        "trainer_peak_rss_mb": round(peak_mb),
        "rollouts_with_continued_completions": sum(1 for n in segments if n >= 2),
        "rollouts": len(finished),
        "mean_completion_tokens": round(sum(e["n_tokens"] for e in finished) / completions, 1),
        "reprefill_after_update": reprefill_costs(samples, run_dir, window_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--window-s", type=float, default=10.0)
    args, overrides = parser.parse_known_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="sdp-bench-long-")) / "run"
    if not any(o.startswith("conf=") for o in overrides):
        overrides.insert(0, f"conf={DEFAULT_CONF}")
    command = [sys.executable, "-m", "sdp_cli", "train", f"run.dir={run_dir}", *overrides]
    print("running:", " ".join(command), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(command)
    samples, peak_mb = poll(proc, run_dir)
    if proc.wait() != 0 or not samples:
        sys.exit(f"sdp train exited with {proc.returncode}; see {run_dir}")
    wall_s = time.monotonic() - start
    print(json.dumps(summary(run_dir, samples, peak_mb, wall_s, args.window_s)))


if __name__ == "__main__":
    main()
