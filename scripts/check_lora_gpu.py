"""LoRA weight sync against one real vLLM server, on a CUDA machine (or `--device cpu` here).

Starts one supervised server with LoRA on (as `sdp train train.lora.rank=R` does), trains the
actor's adapter a step at a time on fixed samples, and at each step exports the adapter, has
the server load it (pause, load_lora_adapter, version, resume, unload the old one) and compares
the server's logprobs under the adapter with the trainer's. Prints one line per step and, last,
one JSON object: adapter size, export and load seconds (median over the steps), the largest
logprob difference, and the adapters the server lists at the end.

    python scripts/check_lora_gpu.py [--model DIR|builtin:smollm2-135m] [--rank 8] [--steps 4]
        [--device cuda|cpu]

Exits 1 when a logprob differs by more than --tolerance (default 1e-3 on CUDA, whose bfloat16 or
TF32 kernels round differently; 1e-4 on the CPU in float32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from sdp_cli.config import load_config
from sdp_cli.config.train_settings import LoraConfig
from sdp_cli.events.event_log import EventLog
from sdp_cli.inference import InferenceClient
from sdp_cli.launcher import ServerFleet
from sdp_cli.launcher.command import with_lora_serving
from sdp_cli.model import ensure_model_dir
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks import load_tokenizer
from sdp_cli.trainer.actor import Actor
from sdp_cli.weight_sync.adapter_export import ADAPTER_WEIGHTS
from sdp_cli.weight_sync.disk import DiskTransport

TEXTS = ["4 + 3 = 7", "9 + 1 = 10", "2 + 2 = 4", "6 + 5 = 11"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tolerance", type=float, default=None)
    return parser.parse_args()


def samples(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt, output) token ids: each text split after its first half."""
    tokenizer = load_tokenizer(model_dir)
    pairs = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = max(1, len(ids) // 2)
        pairs.append((ids[:cut], ids[cut:]))
    return pairs


def groups(actor: Actor, pairs: list[tuple[list[int], list[int]]], version: int) -> list:
    behav = actor.score([p for p, _ in pairs], [o for _, o in pairs])
    trajectories = [
        Trajectory(p, o, lp, [version] * len(o), reward=float(i % 2))
        for i, ((p, o), lp) in enumerate(zip(pairs, behav, strict=True))
    ]
    return [RolloutGroup(rollout_id=version, samples=trajectories)]


async def sync_and_score(
    fleet: ServerFleet, path: Path, version: int, pairs: list[tuple[list[int], list[int]]]
) -> tuple[dict[str, float], list[list[float]]]:
    async with InferenceClient(fleet.pool) as client:
        timings = await DiskTransport(client).load_weights(str(path), version)
        scores = await client.score_many(pairs)
    return timings, scores


def main() -> int:
    args = parse_args()
    cfg = load_config(
        overrides=[
            f"model.path={args.model}",
            "server.count=1",
            f"server.device={args.device}",
            f"train.device={args.device}",
            "train.dtype=float32",
            f"train.lr={args.lr}",
            f"train.lora.rank={args.rank}",
            "server.dtype=float32",
        ]
    )
    tolerance = args.tolerance or (1e-3 if args.device == "cuda" else 1e-4)
    model_dir = ensure_model_dir(cfg.model)
    pairs = samples(model_dir)
    actor = Actor(model_dir, replace(cfg.train, lora=LoraConfig(rank=args.rank)), seed=0)
    work = Path(tempfile.mkdtemp(prefix="sdp-lora-check-"))
    server = with_lora_serving(cfg.server, cfg.train.lora, model_dir)
    print("server flags:", " ".join(server.extra_args), flush=True)
    events = EventLog(work / "events.jsonl")
    fleet = ServerFleet(server, model_dir, work, events=events)
    started = time.perf_counter()
    fleet.start()
    print(f"server ready in {time.perf_counter() - started:.1f} s", flush=True)
    exports, loads, worst = [], [], 0.0
    size = 0
    try:
        for version in range(1, args.steps + 1):
            actor.train_step(groups(actor, pairs, version - 1), version - 1)
            begun = time.perf_counter()
            path = actor.export_weights(work / "weights", version)
            exports.append(time.perf_counter() - begun)
            size = (path / ADAPTER_WEIGHTS).stat().st_size
            timings, served = asyncio.run(sync_and_score(fleet, path, version, pairs))
            loads.append(timings["reload_s"])
            expected = actor.score([p for p, _ in pairs], [o for _, o in pairs])
            diff = max(
                abs(a - b)
                for got, want in zip(served, expected, strict=True)
                for a, b in zip(got, want, strict=True)
            )
            worst = max(worst, diff)
            print(
                f"v{version}: export {exports[-1] * 1000:.0f} ms, load {loads[-1] * 1000:.0f} ms, "
                f"whole update {timings['total_s'] * 1000:.0f} ms, max |Δ logprob| {diff:.2e}",
                flush=True,
            )
        models = httpx.get(f"{fleet.addresses[0]}/v1/models", timeout=10).json()["data"]
        served_adapters = [m["id"] for m in models if m.get("parent")]
    finally:
        fleet.stop()
        events.close()
    result = {
        "model": str(model_dir),
        "device": args.device,
        "rank": args.rank,
        "adapter_bytes": size,
        "export_s_median": statistics.median(exports),
        "load_s_median": statistics.median(loads),
        "max_abs_logprob_diff": worst,
        "tolerance": tolerance,
        "adapters_at_end": served_adapters,
    }
    print(json.dumps(result))
    return 0 if worst <= tolerance and len(served_adapters) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
