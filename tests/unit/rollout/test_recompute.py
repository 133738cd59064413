"""ProximalRecomputer: only v−1 tokens are rewritten, batched scoring with bounded concurrency,
failures isolated."""

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


Pairs = list[tuple[list[int], list[int]]]


async def scores_by_position(samples: Pairs) -> list[list[float]]:
    return [[-100.0 - i for i in range(len(output_ids))] for _, output_ids in samples]


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
    calls: list[Pairs] = []

    async def scorer(samples: Pairs) -> list[list[float]]:
        calls.append(samples)
        return [[0.0] * len(output_ids) for _, output_ids in samples]

    stats = asyncio.run(
        ProximalRecomputer(scorer).recompute([RolloutGroup(0, [current, stale])], version=4)
    )
    assert calls == []
    assert stats.samples == 0
    assert current.prox_logprobs is None and stale.prox_logprobs is None
    assert current.recompute_version == NOT_RECOMPUTED


def test_a_wrong_answer_for_one_sample_fails_only_that_sample() -> None:
    good, short = sample([3, 4], prompt=1), sample([3, 4], prompt=3)

    async def scorer(samples: Pairs) -> list[list[float]]:
        return [[] if prompt == [3] else [-5.0] * len(output) for prompt, output in samples]

    stats = asyncio.run(
        ProximalRecomputer(scorer).recompute([RolloutGroup(0, [good, short])], version=4)
    )
    assert (stats.samples, stats.failures, stats.batches) == (1, 1, 1)
    assert good.prox_logprobs == [-5.0, -2.0]
    assert short.prox_logprobs is None and short.recompute_version == NOT_RECOMPUTED


def test_a_failed_call_fails_its_batch_and_no_other() -> None:
    first = [sample([3, 4], prompt=1) for _ in range(2)]
    second = [sample([3, 4], prompt=2) for _ in range(2)]

    async def scorer(samples: Pairs) -> list[list[float]]:
        if samples[0][0] == [2]:
            raise ConnectionError("server went away")
        return [[-5.0] * len(output) for _, output in samples]

    groups = [RolloutGroup(0, first), RolloutGroup(1, second)]
    stats = asyncio.run(ProximalRecomputer(scorer, batch_size=2).recompute(groups, version=4))
    assert (stats.samples, stats.failures, stats.batches) == (2, 2, 2)
    assert all(s.prox_logprobs == [-5.0, -2.0] for s in first)
    assert all(s.prox_logprobs is None and s.recompute_version == NOT_RECOMPUTED for s in second)


def test_samples_are_scored_in_batches_with_bounded_concurrency() -> None:
    active = 0
    peak = 0
    sizes: list[int] = []

    async def scorer(samples: Pairs) -> list[list[float]]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        sizes.append(len(samples))
        await asyncio.sleep(0.001)
        active -= 1
        return [[0.0] * len(output_ids) for _, output_ids in samples]

    groups = [RolloutGroup(i, [sample([0, 1]) for _ in range(4)]) for i in range(10)]
    recomputer = ProximalRecomputer(scorer, batch_size=6, concurrency=3)
    stats = asyncio.run(recomputer.recompute(groups, version=1))
    assert stats.samples == 40
    assert sorted(sizes) == [4, 6, 6, 6, 6, 6, 6]
    assert stats.batches == 7
    assert peak == 3
    assert stats.seconds > 0


class CountingScorer:
    def __init__(self, value: float = -7.0) -> None:
        self.value = value
        self.calls: list[Pairs] = []

    async def __call__(self, samples: Pairs) -> list[list[float]]:
        self.calls.append(samples)
        return [[self.value] * len(output_ids) for _, output_ids in samples]


def test_early_scores_are_written_at_the_update_without_scoring_again() -> None:
    scorer = CountingScorer()
    recomputer = ProximalRecomputer(scorer)
    buffered = sample([3, 3, 4])
    groups = [RolloutGroup(0, [buffered])]

    assert asyncio.run(recomputer.score_early(groups, version=4)) == 1
    # Nothing is written before the update: a sample taken now keeps p = μ.
    assert buffered.prox_logprobs is None
    stats = asyncio.run(recomputer.recompute(groups, version=4))
    assert len(scorer.calls) == 1
    assert (stats.samples, stats.early_samples, stats.batches) == (1, 1, 0)
    assert buffered.prox_logprobs == [-7.0, -7.0, -3.0]
    assert buffered.recompute_version == 4


def test_early_scores_of_samples_taken_before_the_update_are_never_written() -> None:
    scorer = CountingScorer()
    recomputer = ProximalRecomputer(scorer)
    taken, kept = sample([3, 4], prompt=1), sample([3, 4], prompt=2)
    asyncio.run(
        recomputer.score_early([RolloutGroup(0, [taken]), RolloutGroup(1, [kept])], version=4)
    )
    asyncio.run(recomputer.recompute([RolloutGroup(1, [kept])], version=4))
    assert taken.prox_logprobs is None and taken.recompute_version == NOT_RECOMPUTED
    assert kept.prox_logprobs == [-7.0, -2.0]


def test_early_scores_of_another_version_are_not_used() -> None:
    scorer = CountingScorer()
    recomputer = ProximalRecomputer(scorer)
    buffered = sample([3, 4, 4])
    groups = [RolloutGroup(0, [buffered])]
    asyncio.run(recomputer.score_early(groups, version=4))
    # The update to 5 never came through recompute(…, 4); at 5 the v=4 tokens need scores
    # under 5, so the early ones (under 4) must not stand in for them.
    scorer.value = -9.0
    stats = asyncio.run(recomputer.recompute(groups, version=5))
    assert (stats.early_samples, stats.batches) == (0, 1)
    assert buffered.prox_logprobs == [-1.0, -9.0, -9.0]


def test_early_scoring_skips_what_it_already_scored_and_stops_when_told() -> None:
    scorer = CountingScorer()
    recomputer = ProximalRecomputer(scorer, batch_size=1, concurrency=1)
    first = [RolloutGroup(0, [sample([3, 4])])]
    later = [RolloutGroup(1, [sample([3, 4])]), RolloutGroup(2, [sample([3, 4])])]
    asyncio.run(recomputer.score_early(first, version=4))
    allowed = iter([True, False])
    scored = asyncio.run(
        recomputer.score_early(first + later, version=4, keep_going=lambda: next(allowed))
    )
    # The first group is not sent again; of the two new ones, one call is made before the stop.
    assert scored == 1
    assert len(scorer.calls) == 2


def test_scores_taken_elsewhere_are_kept_and_only_the_rest_goes_to_the_scorer() -> None:
    """rollout.recompute_on=trainer: the trainer scores what `pending` lists, `keep` holds the
    answers, and the update sends only what finished later to the servers."""
    scorer = CountingScorer()
    recomputer = ProximalRecomputer(scorer)
    early, fresh_tokens_only = sample([3, 4], prompt=1), sample([4, 4], prompt=2)
    groups = [RolloutGroup(0, [early, fresh_tokens_only])]
    jobs = recomputer.pending(groups, version=4)
    assert [(s, positions) for s, positions in jobs] == [(early, [0])]
    recomputer.keep(early, [-0.5, -0.6], version=4)
    assert recomputer.pending(groups, version=4) == []
    # A sample that finished after the trainer scored.
    late = sample([3, 3], prompt=3)
    stats = asyncio.run(recomputer.recompute([*groups, RolloutGroup(1, [late])], version=4))
    assert early.prox_logprobs == [-0.5, -2.0]
    assert late.prox_logprobs == [-7.0, -7.0]
    assert [prompt for call in scorer.calls for prompt, _ in call] == [[3]]
    assert (stats.samples, stats.early_samples) == (2, 1)


def test_scores_of_the_wrong_length_are_not_kept() -> None:
    recomputer = ProximalRecomputer(CountingScorer())
    buffered = sample([3, 4])
    recomputer.keep(buffered, [-0.5], version=4)
    assert len(recomputer.pending([RolloutGroup(0, [buffered])], version=4)) == 1


def test_scores_a_continuation_brought_are_written_without_scoring_the_sample() -> None:
    # Interrupted after two version-3 tokens, continued under 4: the continuation's prefill
    # scored those two under 4, what the recompute at 4 needs.
    continued = sample([3, 3, 4, 4])
    continued.prefix_logprobs, continued.prefix_version = [-7.0, -8.0], 4
    # Continued under 3, so its scores are for the recompute at 3; at 4 it is scored.
    older = sample([3, 3, 4])
    older.prefix_logprobs, older.prefix_version = [-7.0, -8.0], 3
    calls: list[Pairs] = []

    async def scorer(samples: Pairs) -> list[list[float]]:
        calls.append(samples)
        return await scores_by_position(samples)

    recomputer = ProximalRecomputer(scorer)
    groups = [RolloutGroup(0, [continued, older])]
    assert [job[0] for job in recomputer.pending(groups, 4)] == [older]
    stats = asyncio.run(recomputer.recompute(groups, version=4))
    assert continued.prox_logprobs == [-7.0, -8.0, -3.0, -4.0]
    assert older.prox_logprobs == [-100.0, -101.0, -3.0]
    assert calls == [[([1], [10, 11, 12])]]
    assert (stats.samples, stats.continued_samples, stats.early_samples) == (2, 1, 0)


def test_a_group_whose_samples_were_continued_needs_no_early_score() -> None:
    continued = sample([3, 4])
    continued.prefix_logprobs, continued.prefix_version = [-7.0], 4
    recomputer = ProximalRecomputer(scores_by_position)
    assert recomputer.write_early(RolloutGroup(0, [continued, sample([4, 4])]), 4)
    assert continued.prox_logprobs == [-7.0, -2.0] and continued.recompute_version == 4
    unscored = sample([3, 4])
    assert not recomputer.write_early(RolloutGroup(1, [unscored]), 4)
    # The update's recompute counts what the take wrote, and scores the rest.
    stats = asyncio.run(recomputer.recompute([RolloutGroup(1, [unscored])], 4))
    assert (stats.samples, stats.continued_samples, stats.batches) == (2, 1, 1)
    assert unscored.prox_logprobs == [-100.0, -2.0]
