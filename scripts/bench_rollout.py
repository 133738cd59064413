"""Benchmarks for the rollout side.

1. The purge on version change and the filter at take over 100,000 buffered groups (target:
   each under 100 ms).
2. `sdp simulate` with zero-latency servers: rollouts per second through the real executor and
   CPU time per rollout (target: under 200 µs).

Run: .venv/bin/python scripts/bench_rollout.py [--buffered N] [--steps N]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from sdp_cli.config import load_config
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.rollout.control import StalenessControl
from sdp_cli.rollout.staleness import StalenessManager
from sdp_cli.rollout.strategy import make_strategy
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.simulate import run_simulation

SAMPLES_PER_GROUP = 4
TOKENS_PER_SAMPLE = 16


def group_at(version: int) -> RolloutGroup:
    samples = [
        Trajectory(
            prompt_ids=[1, 2, 3],
            output_ids=[5] * TOKENS_PER_SAMPLE,
            behav_logprobs=[-1.0] * TOKENS_PER_SAMPLE,
            versions=[version] * TOKENS_PER_SAMPLE,
        )
        for _ in range(SAMPLES_PER_GROUP)
    ]
    return RolloutGroup(rollout_id=-1, samples=samples)


def filled_control(buffered: int) -> StalenessControl:
    """η = 1 with half the buffer finished at version 0 and half at version 1, so moving to
    version 2 makes exactly half of it stale (head_lag 2 > η)."""
    half = buffered // 2
    # Building 100k groups with the cyclic GC on is slow and not what is measured.
    gc.disable()
    manager = StalenessManager(max_staleness=1, batch_size=half, max_concurrent=buffered)
    # As in the executor: dropped groups are freed later, in chunks between loop callbacks.
    core = StalenessControl(
        manager, make_strategy("segment_wise", 1, ProxMode.segment), defer_free=True
    )
    for version in (0, 1):
        if version:
            core.set_version(version)
        for _ in range(half):
            rollout_id = core.admit()
            assert rollout_id is not None
            core.finish(rollout_id, group_at(version))
    assert core.buffer_size == 2 * half
    gc.enable()
    return core


def timed_ms(action: Callable[[], object]) -> str:
    """Wall and CPU milliseconds of one call (CPU time is the fairer number on a busy host)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU"


def release_report(core: StalenessControl) -> str:
    """Time the chunked freeing of what the last purge or take dropped."""
    chunks: list[float] = []
    more = True
    while more:
        started = time.perf_counter()
        more = core.release_dropped()
        chunks.append(time.perf_counter() - started)
    return (
        f"then freeing the dropped groups: {sum(chunks) * 1e3:.1f} ms in {len(chunks)} chunks "
        f"of at most {max(chunks) * 1e3:.1f} ms between loop callbacks"
    )


def bench_purge(buffered: int) -> None:
    core = filled_control(buffered)
    ms = timed_ms(lambda: core.set_version(2))
    print(
        f"purge on version change: {buffered:,} buffered, "
        f"{buffered - core.buffer_size:,} dropped, {core.buffer_size:,} kept in order: {ms}"
    )
    print(f"  {release_report(core)}")


def bench_take_filter(buffered: int) -> None:
    core = filled_control(buffered)
    # Move the version without the purge, so the take filter itself must find the stale half.
    core.manager.set_version(2)
    wanted = buffered // 2
    batch: list[list[RolloutGroup] | None] = []
    ms = timed_ms(lambda: batch.append(core.take(wanted)))
    taken = batch[0]
    assert taken is not None and len(taken) == wanted
    print(
        f"filter at take: {buffered:,} buffered, {buffered - wanted:,} dropped, "
        f"{wanted:,} taken: {ms}"
    )
    print(f"  {release_report(core)}")

    core = filled_control(buffered)
    ms = timed_ms(lambda: core.take(10))
    print(f"take of a batch of 10 from {buffered:,} buffered: {ms}")


def bench_simulate(steps: int) -> None:
    cfg = load_config(
        None,
        [
            f"train.steps={steps}",
            "simulate.token_latency_s=0",
            "simulate.train_step_s=0",
            "simulate.update_s=0",
        ],
    )
    result = run_simulation(cfg)
    submitted = result["rollouts_submitted"]
    print(
        f"sdp simulate, zero-latency servers (B={cfg.rollout.batch_size}, "
        f"n={cfg.rollout.n_samples}, ~{cfg.simulate.mean_new_tokens} tokens, "
        f"prox_mode={cfg.train.prox_mode.value}): "
        f"{submitted:,} rollouts in {result['wall_s']:.2f} s "
        f"= {submitted / result['wall_s']:,.0f} rollouts/s, "
        f"{result['cpu_us_per_rollout']:.0f} µs CPU per rollout"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffered", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=2_000)
    args = parser.parse_args()
    bench_purge(args.buffered)
    bench_take_filter(args.buffered)
    bench_simulate(args.steps)


if __name__ == "__main__":
    main()
