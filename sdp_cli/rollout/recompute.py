"""Proximal recompute for `prox_mode=segment` (docs/design.md, Proximal recompute).

Right before the servers move from v to v+1, while they still hold v, every buffered sample with
tokens of version v−1 gets those tokens' logprobs recomputed under v and stored as p_t. Tokens
of any other version keep their current p_t (μ_t if never recomputed). The scorer is injected and
scores many samples per call: the inference client sends them to vLLM as one prompt list with
`prompt_logprobs`, which is cheaper than a request per sample while the servers are generating
(docs/benchmarks.md).

Scoring early. The servers hold v for the whole interval between two updates, so a score taken
at any moment of it equals the one taken right before the next update. `score_early` scores
buffered samples while the trainer is still training and keeps the answers aside, tagged with v;
`recompute(groups, v)` then writes them, and scores only what is missing, so the update waits
for the samples that finished last instead of for the whole buffer. Answers are written only at
the update, and only into samples still buffered then: a sample the trainer takes before the
update is trained with exactly the p_t it would have had without early scoring.

Scores a continuation brought. A completion interrupted by the update to v continues under v from
prompt + tokens so far; that prefill computes the logprob of every earlier token under v, which
is what the recompute before the update to v+1 needs for its v−1 tokens. With
`rollout.score_continuations` the continuation asks vLLM for them (`prompt_logprobs`), and the
recompute writes them (`Trajectory.prefix_logprobs`) instead of scoring the sample again: the
samples that finish last before an update, which early scoring has the least time for, are
mostly such continuations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory

# async def score_many([(prompt_ids, output_ids), ...]) -> for each pair, the logprob of every
# output token under the server's current weights.
Scorer = Callable[[list[tuple[list[int], list[int]]]], Awaitable[list[list[float]]]]
Job = tuple[Trajectory, list[int]]


def count_missing_recompute(groups: Iterable[RolloutGroup], version: int) -> int:
    """Samples of `groups` with tokens of version−1 not yet recomputed under `version`."""
    return sum(1 for _ in _samples_needing_recompute(groups, version))


@dataclass
class RecomputeStats:
    version: int
    # Trajectories whose v−1 tokens were rewritten.
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    # Of `samples`, those whose scores were taken early (before the update began).
    early_samples: int = 0
    # Of `samples`, those whose scores came with their continuation's prefill.
    continued_samples: int = 0
    # Scoring calls made during the update (each carries up to batch_size samples).
    batches: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def merged(self, other: RecomputeStats) -> RecomputeStats:
        """Two passes of the same update as one."""
        return RecomputeStats(
            version=self.version,
            samples=self.samples + other.samples,
            tokens=self.tokens + other.tokens,
            # The second pass retries what the first failed to score.
            failures=other.failures,
            early_samples=self.early_samples + other.early_samples,
            continued_samples=self.continued_samples + other.continued_samples,
            batches=self.batches + other.batches,
            seconds=self.seconds + other.seconds,
        )


@dataclass
class _EarlyScore:
    # Kept to tell the sample apart from a later object that reuses its id().
    sample: Trajectory
    version: int
    scores: list[float]


class ProximalRecomputer:
    def __init__(self, scorer: Scorer, batch_size: int = 64, concurrency: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (got {concurrency})")
        self._scorer = scorer
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._early: dict[int, _EarlyScore] = {}
        # Samples an early take wrote from scores at hand, counted in the next recompute.
        self._written_at_take: RecomputeStats | None = None

    async def recompute(self, groups: Iterable[RolloutGroup], version: int) -> RecomputeStats:
        """Rewrite p_t of the version−1 tokens of every sample in `groups` under `version`,
        from the early scores where there are some for `version`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        # What an early take wrote for this update counts as part of it.
        stats = self._written_at_take_for(version)
        self._written_at_take = None
        missing = [
            job
            for job in _samples_needing_recompute(groups, version)
            if not self._write_at_hand(job, version, stats)
        ]
        # Early scores of samples the trainer took are of no further use.
        self._early.clear()

        def write(sample: Trajectory, positions: list[int], scores: list[float]) -> None:
            write_proximal(sample, positions, scores, version)
            stats.samples += 1
            stats.tokens += len(positions)

        stats.batches, stats.failures = await self._score_all(missing, write)
        stats.seconds = loop.time() - started
        return stats

    async def score_early(
        self,
        groups: Iterable[RolloutGroup],
        version: int,
        keep_going: Callable[[], bool] = lambda: True,
    ) -> int:
        """Score, under `version`, the samples of `groups` that its recompute will need and
        that have no early score yet; keep the answers for `recompute(…, version)`. Stops
        starting new scoring calls once `keep_going()` is false. Returns the samples scored."""
        scored = 0

        def keep(sample: Trajectory, positions: list[int], scores: list[float]) -> None:
            nonlocal scored
            self.keep(sample, scores, version)
            scored += 1

        await self._score_all(self.pending(groups, version), keep, keep_going)
        return scored

    def pending(self, groups: Iterable[RolloutGroup], version: int) -> list[Job]:
        """The samples of `groups` that `recompute(…, version)` will need and that have no
        early score (or scores from their continuation) yet, with their version−1 positions."""
        self._forget_older_than(version)
        return [
            job
            for job in _samples_needing_recompute(groups, version)
            if self._scores_at_hand(job, version) is None
        ]

    def write_early(self, group: RolloutGroup, version: int) -> bool:
        """If every sample of `group` the recompute at `version` needs has its early score (or
        scores from its continuation), write them all (as the recompute would) and return
        True; else write none."""
        jobs = list(_samples_needing_recompute([group], version))
        if any(self._scores_at_hand(job, version) is None for job in jobs):
            return False
        stats = self._written_at_take_for(version)
        for job in jobs:
            self._write_at_hand(job, version, stats)
        return True

    def keep(self, sample: Trajectory, scores: list[float], version: int) -> None:
        """Hold `scores` (every output token's logprob under `version`) for the recompute."""
        if len(scores) == len(sample.output_ids):
            self._early[id(sample)] = _EarlyScore(sample, version, scores)

    def _written_at_take_for(self, version: int) -> RecomputeStats:
        if self._written_at_take is None or self._written_at_take.version != version:
            self._written_at_take = RecomputeStats(version=version)
        return self._written_at_take

    def _write_at_hand(self, job: Job, version: int, stats: RecomputeStats) -> bool:
        """Write the scores at hand for the job (its continuation's, else its early score),
        counted in `stats`; False if there are none."""
        sample, positions = job
        continued = continuation_logprobs(sample, positions, version)
        scores = continued if continued is not None else self._early_score(sample, version)
        if scores is None:
            return False
        write_proximal(sample, positions, scores, version)
        stats.samples += 1
        stats.tokens += len(positions)
        if continued is not None:
            stats.continued_samples += 1
        else:
            stats.early_samples += 1
        return True

    def _scores_at_hand(self, job: Job, version: int) -> list[float] | None:
        sample, positions = job
        continued = continuation_logprobs(sample, positions, version)
        return continued if continued is not None else self._early_score(sample, version)

    def _early_score(self, sample: Trajectory, version: int) -> list[float] | None:
        early = self._early.get(id(sample))
        if early is None or early.sample is not sample or early.version != version:
            return None
        return early.scores

    def _forget_older_than(self, version: int) -> None:
        if any(early.version != version for early in self._early.values()):
            self._early = {k: e for k, e in self._early.items() if e.version == version}

    async def _score_all(
        self,
        jobs: list[Job],
        on_scored: Callable[[Trajectory, list[int], list[float]], None],
        keep_going: Callable[[], bool] = lambda: True,
    ) -> tuple[int, int]:
        """Score `jobs` in batches, at most `concurrency` calls at once; `on_scored` gets each
        sample with answers of the right length. Returns (calls made, samples failed)."""
        batches = _batches(jobs, self._batch_size)
        counts = [0, 0]

        async def work() -> None:
            for batch in batches:
                if not keep_going():
                    return
                counts[0] += 1
                counts[1] += await self._score_batch(batch, on_scored)

        # A fixed pool of workers pulling from one iterator: bounded concurrency without a
        # task per batch, which matters when thousands of samples are buffered.
        workers = [asyncio.create_task(work()) for _ in range(self._concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        return counts[0], counts[1]

    async def _score_batch(
        self,
        batch: list[Job],
        on_scored: Callable[[Trajectory, list[int], list[float]], None],
    ) -> int:
        """Returns how many samples of the batch failed; those keep their previous p_t."""
        try:
            scores = await self._scorer(
                [(sample.prompt_ids, sample.output_ids) for sample, _ in batch]
            )
            if len(scores) != len(batch):
                raise ValueError(f"scorer answered {len(scores)} of {len(batch)} samples")
        except Exception:
            return len(batch)
        failed = 0
        for (sample, positions), sample_scores in zip(batch, scores, strict=True):
            if len(sample_scores) != len(sample.output_ids):
                failed += 1
                continue
            on_scored(sample, positions, sample_scores)
        return failed


def _batches(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _samples_needing_recompute(groups: Iterable[RolloutGroup], version: int) -> Iterator[Job]:
    target = version - 1
    for group in groups:
        for sample in group.samples:
            if sample.recompute_version >= version:
                continue
            # An episode's context tokens were never sampled: nothing to recompute.
            positions = [
                i for i, v in enumerate(sample.versions) if v == target and sample.is_trained(i)
            ]
            if positions:
                yield sample, positions


def continuation_logprobs(
    sample: Trajectory, positions: list[int], version: int
) -> list[float] | None:
    """The logprobs the continuation of `sample` brought, if it ran under `version` and they
    cover `positions` (output tokens before the continuation, so the v−1 ones always are)."""
    prefix = sample.prefix_logprobs
    if prefix is None or sample.prefix_version != version or max(positions) >= len(prefix):
        return None
    return prefix


def write_proximal(
    sample: Trajectory, positions: list[int], scores: list[float], version: int
) -> None:
    """Store the new p_t at `positions` only; assigned in one step so a reader never sees a
    half-written list."""
    prox = sample.proximal_logprobs()
    for i in positions:
        prox[i] = float(scores[i])
    sample.prox_logprobs = prox
    sample.recompute_version = version
