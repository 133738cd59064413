"""`sdp simulate` with multi-turn episodes (1–6 model turns) and slow environment steps: every
run finishes, the η bound holds over the episodes' model tokens, the capacity ledger adds up,
and every trained token's proximal logprob follows the rule (context tokens are never scored)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdp_cli.config import load_config
from sdp_cli.simulate import run_simulation
from tests.unit.simulate.test_properties import CONFIGS, RUN_TIMEOUT_S, random_config

EPISODES = st.fixed_dictionaries(
    {
        "turns": st.lists(st.integers(1, 6), min_size=1, max_size=3),
        "env_latency": st.sampled_from([0.0, 0.01, 0.05, 0.5, 2.0]),
        "env_tokens": st.integers(0, 12),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=CONFIGS, episodes=EPISODES)
def test_episodes_with_slow_tools_keep_the_bound_the_ledger_and_proximal_exactness(
    params: dict[str, Any], episodes: dict[str, Any]
) -> None:
    steps = 5
    cfg = random_config(params, steps)
    cfg = replace(
        cfg,
        simulate=replace(
            cfg.simulate,
            turns=episodes["turns"],
            env_latency_s=episodes["env_latency"],
            env_tokens=episodes["env_tokens"],
        ),
    )
    result = run_simulation(cfg, timeout_s=RUN_TIMEOUT_S)
    assert result["steps"] == steps
    assert result["consumed"] == steps * params["batch"]
    # The ledger: a group accepted and not dropped from the buffer is consumed or buffered.
    assert result["accepted_live"] == result["consumed"] + result["buffered_at_end"]
    if params["strategy"] == "segment_wise":
        assert result["max_trained_lag"] <= params["eta"]
    assert result["proximal_violations"] == 0, result["proximal_violation_examples"]
    assert result["proximal_checked_tokens"] == sum(result["tokens_by_lag"].values())


def test_a_slow_tool_is_hidden_by_other_episodes_generating() -> None:
    """Episodes of 3 turns of 32 tokens (0.064 s each at 2 ms a token) with a 0.5 s tool call
    between turns take 6× as long as without; run one after another, the trained samples/s
    would fall to 1/6 (0.16). Other episodes generate while tools run, so it falls far less."""
    overrides = [
        "train.steps=20",
        "rollout.max_staleness=2",
        "rollout.max_concurrent=64",
        "simulate.turns=[3]",
        "simulate.latency_jitter=0",
        "simulate.new_tokens=[32]",
    ]
    fast = run_simulation(load_config(None, [*overrides, "simulate.env_latency_s=0"]))
    slow = run_simulation(load_config(None, [*overrides, "simulate.env_latency_s=0.5"]))
    assert fast["steps"] == slow["steps"] == 20
    ratio = slow["samples_per_s"] / fast["samples_per_s"]
    serial = (3 * 32 * 0.002) / (3 * 32 * 0.002 + 2 * 0.5)
    assert ratio > 2 * serial, (fast["samples_per_s"], slow["samples_per_s"])
