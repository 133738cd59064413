"""The simulated rollout workflow: n completions per prompt, resubmitted as a new segment after
each abort, with the executor's gate awaited before every segment (as the inference client does)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from sdp_cli.inference.types import Gate
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
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
    ) -> None:
        self._pool = pool
        self._n_samples = n_samples
        self._mean_new_tokens = mean_new_tokens
        # Drawn from uniformly when given (simulate.new_tokens), else the gamma distribution.
        self._lengths = list(lengths)
        self._rng = rng

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
        return RolloutGroup(rollout_id=rollout_id, samples=samples, submit_version=executor_version)

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
        segments = 0
        while len(output_ids) < target:
            await gate()
            segment = await self._pool.generate(target - len(output_ids))
            if segment.token_ids:
                segments += 1
                output_ids += segment.token_ids
                logprobs += segment.logprobs
                versions += [segment.version] * len(segment.token_ids)
        return Trajectory(
            prompt_ids=list(_PROMPT),
            output_ids=output_ids,
            behav_logprobs=logprobs,
            versions=versions,
            reward=self._rng.random(),
            n_segments=segments,
            generate_s=self._pool.now() - started,
        )
