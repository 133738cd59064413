"""`train.update_mode=keep` in the simulator: a reload freezes requests instead of aborting
them, they go on in place (no resubmission, no second prefill) and their later tokens carry
the new version; the staleness bound, the ledger and the proximal rule hold as in abort mode."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from functools import cache
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdp_cli.config import SdpConfig, load_config
from sdp_cli.config.rollout_settings import Strategy
from sdp_cli.config.simulate_settings import SimulateConfig
from sdp_cli.config.train_settings import ProxMode, UpdateMode
from sdp_cli.events.event_log import EventRecorder
from sdp_cli.events.event_schema import RolloutFinishedEvent, WeightUpdateEvent
from sdp_cli.simulate import run_simulation
from sdp_cli.simulate.clock import SimTime, VirtualTimeLoop
from sdp_cli.simulate.proximal_check import scored_version
from sdp_cli.simulate.sim_server import SimulatedFleet, SimulatedSegment

TOKEN_S = 0.01


@cache
def base_config() -> SdpConfig:
    return load_config(None, [])


def conserved(result: dict[str, Any]) -> bool:
    return result["rollouts_submitted"] == (
        result["running_at_end"]
        + result["accepted_live"]
        + result["rejected"]
        + result["dropped_total"]
    )


def fleet(keep: bool, update_s: float = 0.05) -> SimulatedFleet:
    sim = SimulateConfig(token_latency_s=TOKEN_S, latency_jitter=0.0, update_s=update_s)
    pool = SimulatedFleet(1, sim, random.Random(0), SimTime(0.0))
    pool.keep_requests = keep
    return pool


def generate_across_a_reload(keep: bool) -> SimulatedSegment:
    """A 20-token request with a reload to version 1 after about 5.5 tokens."""

    async def main() -> SimulatedSegment:
        pool = fleet(keep)
        request = asyncio.ensure_future(pool.generate(20))
        await asyncio.sleep(5.5 * TOKEN_S)
        await pool.load_weights(None, 1)
        return await request

    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_pause_with_keep_splits_one_request_at_the_reload() -> None:
    segment = generate_across_a_reload(keep=True)
    assert segment.finish_reason == "length"
    assert len(segment.token_ids) == 20
    # 5 tokens completed before the pause; the sixth was frozen and completed after it.
    assert segment.token_versions() == [0] * 5 + [1] * 15
    # Each token's logprob is of the weights that sampled it.
    assert [scored_version(lp) for lp in segment.logprobs] == segment.token_versions()


def test_a_pause_with_abort_returns_the_tokens_so_far() -> None:
    segment = generate_across_a_reload(keep=False)
    assert segment.finish_reason == "abort"
    assert segment.token_versions() == [0] * 5


def keep_run(*overrides: str, events: Any = None) -> dict[str, Any]:
    cfg = load_config(None, ["train.update_mode=keep", *overrides])
    return run_simulation(cfg, events=events)


def test_keep_mode_resubmits_nothing_and_completions_span_versions() -> None:
    sink = EventRecorder()
    result = keep_run("simulate.mean_new_tokens=64", "simulate.prefill_s=0.002", events=sink)
    assert result["segments_aborted"] == 0
    # Nothing was aborted, so nothing was resubmitted or prefilled twice; yet completions
    # span versions: one request went on across a reload.
    assert max(event.n_segments for event in sink.of(RolloutFinishedEvent)) > 1
    assert result["proximal_violations"] == 0 and result["recompute_missed"] == 0
    assert result["max_trained_lag"] <= 2 and conserved(result)


def test_the_weight_update_event_reports_the_pause_per_update_in_both_modes() -> None:
    pauses: dict[str, list[float]] = {}
    for mode in ("abort", "keep"):
        sink = EventRecorder()
        run_simulation(
            load_config(None, [f"train.update_mode={mode}", "simulate.update_s=0.05"]),
            events=sink,
        )
        updates = sink.of(WeightUpdateEvent)
        assert updates and all(u.update_mode == mode for u in updates)
        assert ("abort_s" in updates[0].phases) == (mode == "abort")
        pauses[mode] = [u.generation_pause_s or 0.0 for u in updates]
    # Keep mode stops generating only for the reload; abort mode from the first abort, which
    # comes before the recompute's second pass, to the resume.
    assert min(pauses["keep"]) >= 0.05 - 1e-9
    assert sum(pauses["abort"]) > sum(pauses["keep"])


CONFIGS = st.fixed_dictionaries(
    {
        "eta": st.integers(0, 3),
        "batch": st.integers(1, 4),
        "concurrent": st.integers(1, 12),
        "n_samples": st.integers(1, 3),
        "servers": st.integers(1, 3),
        "server_batch": st.integers(1, 8),
        "jitter": st.floats(0, 1.5),
        "train_step": st.sampled_from([0.0, 0.005, 0.05]),
        "update": st.sampled_from([0.0, 0.01]),
        "prefill": st.sampled_from([0.0, 0.004]),
        "strategy": st.sampled_from(["standard", "segment_wise"]),
        "prox_mode": st.sampled_from(["segment", "recompute", "loglinear"]),
        "overlap": st.booleans(),
        "early": st.booleans(),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=CONFIGS)
def test_random_keep_mode_configurations_hold_the_bound_and_the_ledger(
    params: dict[str, Any],
) -> None:
    """Every schedule finishes all its steps; segment_wise trains nothing older than η; the
    ledger adds up; no request is aborted; every trained p_t is what the proximal rule gives
    and no buffered sample misses its recompute (the hold before the last pass)."""
    steps = 8
    base = base_config()
    cfg = replace(
        base,
        train=replace(
            base.train,
            steps=steps,
            prox_mode=ProxMode(params["prox_mode"]),
            update_mode=UpdateMode.keep,
            overlap_reload=params["overlap"],
        ),
        rollout=replace(
            base.rollout,
            max_staleness=params["eta"],
            batch_size=params["batch"],
            max_concurrent=params["concurrent"],
            n_samples=params["n_samples"],
            strategy=Strategy(params["strategy"]),
            recompute_early=params["early"],
        ),
        server=replace(base.server, count=params["servers"]),
        simulate=replace(
            base.simulate,
            server_batch=params["server_batch"],
            latency_jitter=params["jitter"],
            train_step_s=params["train_step"],
            update_s=params["update"],
            prefill_s=params["prefill"],
            seed=params["seed"],
            mean_new_tokens=8,
        ),
    )
    result = run_simulation(cfg)
    assert result["steps"] == steps
    assert result["consumed"] == steps * params["batch"]
    assert conserved(result)
    assert result["segments_aborted"] == 0
    assert result["proximal_violations"] == 0
    assert result["recompute_missed"] == 0
    if params["strategy"] == "segment_wise" or params["eta"] == 0:
        assert result["max_trained_lag"] <= params["eta"]
