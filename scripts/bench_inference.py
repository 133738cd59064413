"""Benchmark the inference client against a bare httpx loop, and time the weight-update protocol.

Starts one vLLM server through the launcher, then in the same run sends the same requests
(fixed length completions, so both sides generate the same number of tokens) at the same
concurrency, alternating bare loop and client for a few rounds, and prints tokens/s of each and
their ratio. Then it times `update_weights` by phase on the idle server.

    .venv/bin/python scripts/bench_inference.py [--concurrency 128] [--requests 256] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from sdp_cli.config import load_config
from sdp_cli.inference import InferenceClient, SamplingParams
from sdp_cli.inference.protocol import GENERATE_PATH, generate_body
from sdp_cli.launcher import ServerFleet
from sdp_cli.model import ensure_model_dir
from sdp_cli.weight_sync.disk import DiskTransport

# Loading the CA bundle for each of a hundred clients would cost the bare loop seconds of CPU.
SHARED_SSL = ssl.create_default_context()


def prompts(count: int) -> list[list[int]]:
    return [[1, 4 + i % 40, 4 + (i * 7) % 40, 4 + (i * 13) % 40] for i in range(count)]


async def bounded(concurrency: int, jobs: list[Callable[[], Awaitable[int]]]) -> int:
    """Run the jobs with at most `concurrency` at once; returns the tokens they produced."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[int]]) -> int:
        async with gate:
            return await job()

    return sum(await asyncio.gather(*(one(job) for job in jobs)))


async def bare_loop(address: str, args: argparse.Namespace) -> tuple[int, float]:
    """The same requests straight through httpx: no routing, no retries, no segments.

    `concurrency` workers each own one httpx client (one keep-alive connection) and take
    requests from a shared queue. One AsyncClient shared by all workers would be slower: httpx's
    pool hands an idle connection to many waiting requests at once and they queue behind it
    (see sdp_cli/inference/connections.py), and the baseline should be the best plain loop."""
    queue: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
    for item in enumerate(prompts(args.requests)):
        queue.put_nowait(item)
    clients = [httpx.AsyncClient(verify=SHARED_SSL, timeout=600.0) for _ in range(args.concurrency)]

    async def worker(http: httpx.AsyncClient) -> int:
        tokens = 0
        while not queue.empty():
            i, prompt = queue.get_nowait()
            fields = SamplingParams(seed=i, min_tokens=args.tokens).request_fields(args.tokens, 0)
            body = generate_body(f"bare-{i}-{time.time_ns()}", prompt, fields)
            response = await http.post(address + GENERATE_PATH, json=body)
            response.raise_for_status()
            choice = response.json()["choices"][0]
            logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
            assert len(logprobs) == len(choice["token_ids"])
            tokens += len(choice["token_ids"])
        return tokens

    try:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker(http) for http in clients)))
        return tokens, time.perf_counter() - start
    finally:
        for http in clients:
            await http.aclose()


async def through_client(client: InferenceClient, args: argparse.Namespace) -> tuple[int, float]:
    def job(i: int, prompt: list[int]) -> Callable[[], Awaitable[int]]:
        async def send() -> int:
            sampling = SamplingParams(seed=i, min_tokens=args.tokens)
            completion = await client.generate(prompt, sampling, args.tokens)
            return len(completion.output_ids)

        return send

    start = time.perf_counter()
    tokens = await bounded(
        args.concurrency, [job(i, p) for i, p in enumerate(prompts(args.requests))]
    )
    return tokens, time.perf_counter() - start


def write_weights(model_dir: Path, target: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(target, safe_serialization=True)
    return target


async def benchmark(fleet: ServerFleet, model_dir: Path, args: argparse.Namespace) -> dict:
    address = fleet.addresses[0]
    results: dict = {"concurrency": args.concurrency, "requests": args.requests}
    async with InferenceClient(fleet.pool, max_model_len=fleet.server.max_model_len) as client:
        # Warm both paths (connections, the server's first batches).
        await bare_loop(address, argparse.Namespace(**{**vars(args), "requests": 32}))
        await through_client(client, argparse.Namespace(**{**vars(args), "requests": 32}))
        rates: dict[str, list[float]] = {"bare": [], "client": []}
        cpu: dict[str, list[float]] = {"bare": [], "client": []}
        pair_ratios: list[float] = []
        runs = {
            "bare": lambda: bare_loop(address, args),
            "client": lambda: through_client(client, args),
        }
        for round_ in range(args.rounds):
            # ABBA order, and a ratio per adjacent pair: the load of a shared machine drifts,
            # and this way the drift hits both sides alike.
            order = ("bare", "client") if round_ % 2 == 0 else ("client", "bare")
            for name in order:
                cpu_start = time.process_time()
                tokens, seconds = await runs[name]()
                cpu[name].append((time.process_time() - cpu_start) / tokens * 1e6)
                rates[name].append(tokens / seconds)
            pair_ratios.append(rates["client"][-1] / rates["bare"][-1])
            print(
                f"round {round_ + 1}: bare {rates['bare'][-1]:7,.0f} tokens/s, "
                f"client {rates['client'][-1]:7,.0f} tokens/s, ratio {pair_ratios[-1]:.3f}",
                flush=True,
            )
        results.update(
            bare_tokens_per_s=statistics.median(rates["bare"]),
            client_tokens_per_s=statistics.median(rates["client"]),
            ratio=statistics.median(pair_ratios),
            bare_cpu_ms_per_1k_tokens=statistics.median(cpu["bare"]),
            client_cpu_ms_per_1k_tokens=statistics.median(cpu["client"]),
        )

        with tempfile.TemporaryDirectory() as tmp:
            dirs = [write_weights(model_dir, Path(tmp) / f"w{i}", i) for i in range(2)]
            phases: dict[str, list[float]] = {}
            version = fleet.pool.target().version
            for i in range(args.updates):
                version += 1
                timings = await DiskTransport(client).load_weights(str(dirs[i % 2]), version)
                for key in ("pause_s", "reload_s", "version_s", "resume_s", "total_s"):
                    phases.setdefault(key, []).append(timings[key])
            results["weight_update_median_s"] = {k: statistics.median(v) for k, v in phases.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.path=DIR")
    args = parser.parse_args()

    cfg = load_config(overrides=["server.count=1", *args.overrides])
    model_dir = ensure_model_dir(cfg.model)
    with (
        tempfile.TemporaryDirectory() as run_dir,
        ServerFleet(cfg.server, model_dir, Path(run_dir)) as fleet,
    ):
        print(f"server ready at {fleet.addresses[0]}", flush=True)
        results = asyncio.run(benchmark(fleet, model_dir, args))

    print()
    print(
        f"generation, concurrency {args.concurrency}, {args.requests} requests x "
        f"{args.tokens} tokens (median of {args.rounds} rounds):"
    )
    print(f"  bare httpx loop   {results['bare_tokens_per_s']:>10,.0f} tokens/s")
    print(f"  InferenceClient   {results['client_tokens_per_s']:>10,.0f} tokens/s")
    print(f"  ratio (median of per-round ratios) {results['ratio']:.3f}")
    print(
        "  CPU of this process per 1k tokens: "
        f"bare {results['bare_cpu_ms_per_1k_tokens']:.1f} ms, "
        f"client {results['client_cpu_ms_per_1k_tokens']:.1f} ms"
    )
    print(f"weight update, tiny model (median of {args.updates}):")
    for phase, seconds in results["weight_update_median_s"].items():
        print(f"  {phase.removesuffix('_s'):8s} {seconds * 1000:8.1f} ms")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
