"""ProximalRecomputer: only v−1 tokens are rewritten, bounded concurrency, failures isolated."""

from __future__ import annotations

import asyncio

from sdp_cli.rollout.recompute import ProximalRecomputer
from sdp_cli.rollout.trajectory import NOT_RECOMPUTED, RolloutGroup, Trajectory


def sample(versions: list[int], prompt: int = 1, prox: list[float] | None = None) -> Trajectory:
    return Trajectory(
        prompt_ids=[prompt],
        output_ids=list(range(10, 10 + len(versions))),
        behav_logprobs=[-1.0 - i for i in range(len(versions))],
        versions=versions,
        prox_logprobs=prox,
    )


async def scores_by_position(prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    return [-100.0 - i for i in range(len(output_ids))]


def test_only_tokens_of_the_previous_version_are_rewritten() -> None:
    older = sample([2, 2, 3, 3, 4], prox=[-9.0, -9.0, -1.0, -1.0, -1.0])
    group = RolloutGroup(rollout_id=0, samples=[older])
    stats = asyncio.run(ProximalRecomputer(scores_by_position).recompute([group], version=4))
    # Version-3 tokens (positions 2, 3) get p under v=4; v−2 tokens keep their earlier p and
    # the newest segment keeps p = μ.
    assert older.prox_logprobs == [-9.0, -9.0, -102.0, -103.0, -1.0]
    assert older.recompute_version == 4
    assert older.behav_logprobs == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert (stats.samples, stats.tokens, stats.failures) == (1, 2, 0)


def test_defaults_to_behaviour_logprobs_where_nothing_was_recomputed() -> None:
    fresh = sample([3, 4, 4])
    asyncio.run(ProximalRecomputer(scores_by_position).recompute([RolloutGroup(0, [fresh])], 4))
    assert fresh.prox_logprobs == [-100.0, -2.0, -3.0]


def test_samples_without_previous_version_tokens_are_untouched() -> None:
    current = sample([4, 4])
    stale = sample([2, 2])
    calls: list[list[int]] = []

    async def scorer(prompt_ids: list[int], output_ids: list[int]) -> list[float]:
        calls.append(prompt_ids)
        return [0.0] * len(output_ids)

    stats = asyncio.run(
        ProximalRecomputer(scorer).recompute([RolloutGroup(0, [current, stale])], version=4)
    )
    assert calls == []
    assert stats.samples == 0
    assert current.prox_logprobs is None and stale.prox_logprobs is None
    assert current.recompute_version == NOT_RECOMPUTED


def test_a_failure_leaves_the_sample_unchanged_and_is_counted() -> None:
    good, bad, short = sample([3, 4], prompt=1), sample([3, 4], prompt=2), sample([3], prompt=3)

    async def scorer(prompt_ids: list[int], output_ids: list[int]) -> list[float]:
        if prompt_ids == [2]:
            raise ConnectionError("server went away")
        if prompt_ids == [3]:
            return []  # wrong length
        return [-5.0] * len(output_ids)

    stats = asyncio.run(
        ProximalRecomputer(scorer).recompute([RolloutGroup(0, [good, bad, short])], version=4)
    )
    assert (stats.samples, stats.failures) == (1, 2)
    assert good.prox_logprobs == [-5.0, -2.0]
    assert bad.prox_logprobs is None and bad.recompute_version == NOT_RECOMPUTED
    assert short.prox_logprobs is None and short.recompute_version == NOT_RECOMPUTED


def test_concurrency_is_bounded() -> None:
    active = 0
    peak = 0

    async def scorer(prompt_ids: list[int], output_ids: list[int]) -> list[float]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.001)
        active -= 1
        return [0.0] * len(output_ids)

    groups = [RolloutGroup(i, [sample([0, 1]) for _ in range(4)]) for i in range(10)]
    stats = asyncio.run(ProximalRecomputer(scorer, concurrency=3).recompute(groups, version=1))
    assert stats.samples == 40
    assert peak == 3
    assert stats.seconds > 0
