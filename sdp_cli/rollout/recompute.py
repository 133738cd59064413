"""Proximal recompute for `prox_mode=segment` (DESIGN §3).

Right before the servers move from v to v+1, while they still hold v, every buffered sample with
tokens of version v−1 gets those tokens' logprobs recomputed under v and stored as p_t. Tokens
of any other version keep their current p_t (μ_t if never recomputed). The scorer is injected;
the inference client provides one backed by vLLM `prompt_logprobs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory

# async def score(prompt_ids, output_ids) -> logprob of every output token under the server's
# current weights.
Scorer = Callable[[list[int], list[int]], Awaitable[list[float]]]


@dataclass
class RecomputeStats:
    version: int
    # Trajectories whose v−1 tokens were rewritten.
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class ProximalRecomputer:
    def __init__(self, scorer: Scorer, concurrency: int = 16) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (got {concurrency})")
        self._scorer = scorer
        self._concurrency = concurrency

    async def recompute(self, groups: Iterable[RolloutGroup], version: int) -> RecomputeStats:
        """Rewrite p_t of the version−1 tokens of every sample in `groups` under `version`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        stats = RecomputeStats(version=version)
        jobs = _samples_needing_recompute(groups, version)
        # A fixed pool of workers pulling from one iterator: bounded concurrency without a
        # task per sample, which matters when thousands are buffered.
        workers = [
            asyncio.create_task(self._work(jobs, version, stats)) for _ in range(self._concurrency)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        stats.seconds = loop.time() - started
        return stats

    async def _work(
        self, jobs: Iterator[tuple[Trajectory, list[int]]], version: int, stats: RecomputeStats
    ) -> None:
        for sample, positions in jobs:
            try:
                scores = await self._scorer(sample.prompt_ids, sample.output_ids)
                if len(scores) != len(sample.output_ids):
                    raise ValueError(
                        f"scorer returned {len(scores)} logprobs for "
                        f"{len(sample.output_ids)} tokens"
                    )
            except Exception:
                # The sample keeps its previous p_t; the caller sees the failure count.
                stats.failures += 1
                continue
            write_proximal(sample, positions, scores, version)
            stats.samples += 1
            stats.tokens += len(positions)


def _samples_needing_recompute(
    groups: Iterable[RolloutGroup], version: int
) -> Iterator[tuple[Trajectory, list[int]]]:
    target = version - 1
    for group in groups:
        for sample in group.samples:
            if sample.recompute_version >= version:
                continue
            positions = [i for i, v in enumerate(sample.versions) if v == target]
            if positions:
                yield sample, positions


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
