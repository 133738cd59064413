"""`sdp simulate`'s proximal check: every trained token's p_t against the rule (docs/design.md,
Proximal recompute); a normal run has no violation, a broken recompute path has some."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config import load_config
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.rollout.recompute import ProximalRecomputer, RecomputeStats
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.simulate import run_simulation
from sdp_cli.simulate.proximal_check import (
    ACCEPTED_AT,
    ProximalCheck,
    scored_version,
    simulated_logprob,
)
from sdp_cli.simulate.sim_server import SimulatedSegment, SimulatedServer

runner = CliRunner()

# Long completions at η = 2: many span updates, so the recompute, the early scores, the early
# take and the continuations' scores all have v−1 tokens to cover.
LONG = ("train.steps=16", "simulate.mean_new_tokens=48", "rollout.max_staleness=2")


def simulate(*overrides: str) -> dict[str, Any]:
    return run_simulation(load_config(None, list(overrides)), timeout_s=60)


def trained_tokens(result: dict[str, Any]) -> int:
    return sum(result["tokens_by_lag"].values())


def test_a_simulated_logprob_says_its_version_and_position() -> None:
    assert scored_version(simulated_logprob(0, 0)) == 0
    assert scored_version(simulated_logprob(12_345, 987)) == 987
    assert simulated_logprob(3, 4) != simulated_logprob(3, 5)
    assert simulated_logprob(3, 4) != simulated_logprob(4, 4)


@pytest.mark.parametrize(
    ("token_version", "accepted_at", "trained_at", "expected"),
    [
        (4, 4, 5, 4),  # newest segment: μ
        (4, 4, 6, 5),  # buffered at the update 5 → 6: recomputed under 5
        (4, 5, 6, 5),  # accepted at 5, still before that update
        (4, 6, 7, 4),  # the update 5 → 6 came while the group was generating
        (3, 4, 7, 4),
    ],
)
def test_the_rule_in_segment_mode(
    token_version: int, accepted_at: int, trained_at: int, expected: int
) -> None:
    check = ProximalCheck(ProxMode.segment)
    assert check.expected_version(token_version, accepted_at, trained_at) == expected


@pytest.mark.parametrize("prox_mode", [ProxMode.recompute, ProxMode.loglinear])
def test_other_modes_leave_p_equal_to_mu(prox_mode: ProxMode) -> None:
    assert ProximalCheck(prox_mode).expected_version(4, 4, 9) == 4


def test_the_check_names_a_token_scored_under_the_wrong_version() -> None:
    sample = Trajectory(
        prompt_ids=[1],
        output_ids=[7, 8],
        behav_logprobs=[simulated_logprob(0, 3), simulated_logprob(1, 4)],
        versions=[3, 4],
        # Trained at 5, position 0 (version 3) needs its score under 4 but kept μ; position 1,
        # the newest segment, rightly keeps μ.
        prox_logprobs=[simulated_logprob(0, 3), simulated_logprob(1, 4)],
    )
    group = RolloutGroup(rollout_id=9, samples=[sample], meta={ACCEPTED_AT: 4})
    check = ProximalCheck(ProxMode.segment)
    check.check([group], version=5, step=2)
    assert check.checked_tokens == 2
    assert check.violations == 1
    assert check.examples[0].as_dict() == {
        "step": 2,
        "rollout_id": 9,
        "sample": 0,
        "position": 0,
        "token_version": 3,
        "expected_version": 4,
        "got_version": 3,
    }


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("train.overlap_reload=false",),
        ("rollout.recompute_early=false",),
        ("rollout.score_continuations=false",),
        ("rollout.recompute_early=false", "rollout.score_continuations=false"),
        ("train.prox_mode=loglinear",),
        ("rollout.strategy=standard", "rollout.max_concurrent=16"),
    ],
)
def test_a_normal_run_has_no_proximal_violation(overrides: tuple[str, ...]) -> None:
    result = simulate(*LONG, *overrides)
    assert result["proximal_violations"] == 0, result["proximal_violation_examples"]
    assert result["proximal_checked_tokens"] == trained_tokens(result)
    if result["prox_mode"] == "segment":
        assert result["recomputed_tokens"] > 0


def test_a_recompute_that_writes_nothing_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    async def recompute_nothing(
        self: ProximalRecomputer, groups: list[RolloutGroup], version: int
    ) -> RecomputeStats:
        return RecomputeStats(version=version)

    monkeypatch.setattr(ProximalRecomputer, "recompute", recompute_nothing)
    result = simulate(*LONG)
    assert result["proximal_violations"] > 0
    example = result["proximal_violation_examples"][0]
    # The token kept μ, its own version's logprob, where the rule wants the next version's.
    assert example["got_version"] == example["token_version"]
    assert example["expected_version"] == example["token_version"] + 1


def test_an_early_take_that_skips_the_write_is_seen_where_recompute_missed_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch taken ahead leaves the buffer before the version change, so recompute_missed,
    which counts what is still buffered then, never sees it."""

    def claim_without_writing(self: ProximalRecomputer, group: RolloutGroup, version: int) -> bool:
        return True

    monkeypatch.setattr(ProximalRecomputer, "write_early", claim_without_writing)
    result = simulate(*LONG)
    assert result["recompute_missed"] == 0
    assert result["proximal_violations"] > 0


def test_continuation_scores_under_the_wrong_version_are_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate = SimulatedServer.generate

    async def stale_prefill(
        self: SimulatedServer, max_tokens: int, position: int = 0, score_prefix: bool = False
    ) -> SimulatedSegment:
        # The prefix scored under the weights before the segment's own.
        segment = await generate(self, max_tokens, position, score_prefix)
        if segment.prefix_logprobs is not None:
            segment.prefix_logprobs = [
                simulated_logprob(i, segment.version - 1) for i in range(position)
            ]
        return segment

    monkeypatch.setattr(SimulatedServer, "generate", stale_prefill)
    assert simulate(*LONG)["proximal_violations"] > 0
    # Without continuation scores the recompute scores those samples itself.
    assert simulate(*LONG, "rollout.score_continuations=false")["proximal_violations"] == 0


def test_cli_reports_the_check_in_json_and_text() -> None:
    result = runner.invoke(app, ["simulate", "--json", "train.steps=4"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["proximal_violations"] == 0
    assert data["proximal_checked_tokens"] > 0
    assert data["proximal_violation_examples"] == []
    table = runner.invoke(app, ["simulate", "train.steps=3"])
    assert table.exit_code == 0, table.output
    assert "proximal violations" in table.stdout
