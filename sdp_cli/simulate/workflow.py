"""The simulated rollout workflow: n completions per prompt, resubmitted as a new segment after
each abort, with the executor's gate awaited before every segment (as the inference client does).
With `score_continuations`, a continuation asks for its prefix's logprobs, and the completion
keeps those of the last continuation that brought tokens, as the inference client does."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

from sdp_cli.inference.types import Gate
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.simulate.proximal_check import ACCEPTED_AT
from sdp_cli.simulate.sim_server import SimulatedFleet

_PROMPT = [1, 2, 3, 4]
# Gamma shape for completion lengths: coefficient of variation 1/sqrt(4) = 0.5.
_LENGTH_SHAPE = 4.0


class SimulatedWorkflow:
    def __init__(
        self,
        pool: SimulatedFleet,
        n_samples: int,
        mean_new_tokens: int,
        rng: random.Random,
        lengths: Sequence[int] = (),
        score_continuations: bool = False,
        uninformative_fraction: float = 0.0,
    ) -> None:
        self._pool = pool
        self._n_samples = n_samples
        self._mean_new_tokens = mean_new_tokens
        # Drawn from uniformly when given (simulate.new_tokens), else the gamma distribution.
        self._lengths = list(lengths)
        self._rng = rng
        self._score_continuations = score_continuations
        self._uninformative_fraction = uninformative_fraction
        # The executor's version, for the proximal check; set once the executor exists.
        self.executor_version: Callable[[], int] = lambda: 0

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup:
        started = self._pool.now()
        if self._n_samples == 1:
            samples = [await self._complete(gate, started)]
        else:
            samples = list(
                await asyncio.gather(
                    *(self._complete(gate, started) for _ in range(self._n_samples))
                )
            )
        # No draw at fraction 0, so runs without it keep their random sequence.
        if self._uninformative_fraction > 0 and self._rng.random() < self._uninformative_fraction:
            # All rewards equal: every advantage 0 (as a group all wrong on a hard task).
            for sample in samples:
                sample.reward = 0.0
        # The executor accepts the group in the loop step in which this returns, so at the
        # version it is at now.
        return RolloutGroup(
            rollout_id=rollout_id,
            samples=samples,
            submit_version=executor_version,
            meta={ACCEPTED_AT: self.executor_version()},
        )

    def _draw_length(self) -> int:
        if self._lengths:
            return self._rng.choice(self._lengths)
        mean = self._mean_new_tokens
        return max(1, round(self._rng.gammavariate(_LENGTH_SHAPE, mean / _LENGTH_SHAPE)))

    async def _complete(self, gate: Gate, started: float) -> Trajectory:
        target = self._draw_length()
        output_ids: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        prefix_logprobs: list[float] | None = None
        prefix_version: int | None = None
        segments = 0
        while len(output_ids) < target:
            await gate()
            done = len(output_ids)
            segment = await self._pool.generate(
                target - done, done, score_prefix=self._score_continuations and done > 0
            )
            if segment.token_ids:
                token_versions = segment.token_versions()
                # Segments are runs of one version, as the inference client counts them: a
                # request frozen across a reload (update_mode=keep) makes two.
                segments += sum(
                    1
                    for i, v in enumerate(token_versions)
                    if v != (token_versions[i - 1] if i else versions[-1] if versions else None)
                )
                output_ids += segment.token_ids
                logprobs += segment.logprobs
                versions += token_versions
                if segment.prefix_logprobs is not None:
                    prefix_logprobs, prefix_version = segment.prefix_logprobs, segment.version
        return Trajectory(
            prompt_ids=list(_PROMPT),
            output_ids=output_ids,
            behav_logprobs=logprobs,
            versions=versions,
            reward=self._rng.random(),
            n_segments=segments,
            generate_s=self._pool.now() - started,
            prefix_logprobs=prefix_logprobs,
            prefix_version=prefix_version,
        )
