"""The simulated rollout workflow: n completions per prompt, resubmitted as a new segment after
each abort, with the executor's gate awaited before every segment (as the inference client does).
With `score_continuations`, a continuation asks for its prefix's logprobs, and the completion
keeps those of the last continuation that brought tokens, as the inference client does.

With `turns`, each sample is an episode: a number of model turns drawn from `turns`, each as
long as a completion, and between two turns an environment step of `env_latency_s` (lognormal)
in simulated time, which adds `env_tokens` context tokens (not trained). Their continuations do
not ask for prefix scores (the real ones do, from the episode's first output token), so the
simulated recompute scores every episode itself."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sdp_cli.inference.types import Gate
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.simulate.proximal_check import ACCEPTED_AT
from sdp_cli.simulate.sim_server import SimulatedFleet

_PROMPT = [1, 2, 3, 4]
# Gamma shape for completion lengths: coefficient of variation 1/sqrt(4) = 0.5.
_LENGTH_SHAPE = 4.0


@dataclass(frozen=True)
class SimulatedEpisodes:
    """Simulated multi-turn episodes (simulate.turns, env_latency_s, env_tokens)."""

    turns: Sequence[int] = ()
    env_latency_s: float = 0.0
    env_tokens: int = 8
    latency_jitter: float = 0.3


@dataclass
class _Output:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    segments: int = 0
    prefix_logprobs: list[float] | None = None
    prefix_version: int | None = None


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
        episodes: SimulatedEpisodes | None = None,
    ) -> None:
        self._pool = pool
        self._n_samples = n_samples
        self._mean_new_tokens = mean_new_tokens
        # Drawn from uniformly when given (simulate.new_tokens), else the gamma distribution.
        self._lengths = list(lengths)
        self._rng = rng
        self._score_continuations = score_continuations
        self._uninformative_fraction = uninformative_fraction
        self._episodes = episodes if episodes is not None and episodes.turns else None
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
        if self._episodes is not None:
            return await self._episode(self._episodes, gate, started)
        out = _Output()
        await self._model_turn(out, gate, self._draw_length(), self._score_continuations)
        return Trajectory(
            prompt_ids=list(_PROMPT),
            output_ids=out.output_ids,
            behav_logprobs=out.logprobs,
            versions=out.versions,
            reward=self._rng.random(),
            n_segments=out.segments,
            generate_s=self._pool.now() - started,
            prefix_logprobs=out.prefix_logprobs,
            prefix_version=out.prefix_version,
        )

    async def _model_turn(self, out: _Output, gate: Gate, length: int, score: bool) -> None:
        """`length` model tokens appended to `out`, segment by segment."""
        target = len(out.output_ids) + length
        start = len(out.output_ids)
        while len(out.output_ids) < target:
            await gate()
            done = len(out.output_ids)
            segment = await self._pool.generate(
                target - done, done, score_prefix=score and done > start
            )
            if segment.token_ids:
                token_versions = segment.token_versions()
                # Segments are runs of one version, as the inference client counts them: a
                # request frozen across a reload (update_mode=keep) makes two.
                previous = out.versions[-1] if out.versions else None
                out.segments += sum(
                    1
                    for i, v in enumerate(token_versions)
                    if v != (token_versions[i - 1] if i else previous)
                )
                out.output_ids += segment.token_ids
                out.logprobs += segment.logprobs
                out.versions += token_versions
                out.trained += [True] * len(segment.token_ids)
                if segment.prefix_logprobs is not None:
                    out.prefix_logprobs, out.prefix_version = (
                        segment.prefix_logprobs,
                        segment.version,
                    )

    async def _episode(self, episodes: SimulatedEpisodes, gate: Gate, started: float) -> Trajectory:
        out = _Output()
        env_s = 0.0
        n_turns = self._rng.choice(list(episodes.turns))
        turns: list[dict[str, object]] = [
            {"role": "user", "text": "", "n_tokens": len(_PROMPT), "trained": False}
        ]
        for turn in range(n_turns):
            before = len(out.output_ids)
            await self._model_turn(out, gate, self._draw_length(), score=False)
            turns.append(
                {
                    "role": "assistant",
                    "text": "",
                    "n_tokens": len(out.output_ids) - before,
                    "trained": True,
                }
            )
            if turn == n_turns - 1:
                break
            seconds = self._env_latency(episodes)
            await self._pool.sleep(seconds)
            env_s += seconds
            # Context tokens: logprob 0, the version of the model token before them.
            version = out.versions[-1] if out.versions else 0
            out.output_ids += [0] * episodes.env_tokens
            out.logprobs += [0.0] * episodes.env_tokens
            out.versions += [version] * episodes.env_tokens
            out.trained += [False] * episodes.env_tokens
            turns.append(
                {"role": "tool", "text": "", "n_tokens": episodes.env_tokens, "trained": False}
            )
        generate_s = self._pool.now() - started - env_s
        return Trajectory(
            prompt_ids=list(_PROMPT),
            output_ids=out.output_ids,
            behav_logprobs=out.logprobs,
            versions=out.versions,
            reward=self._rng.random(),
            n_segments=out.segments,
            generate_s=generate_s,
            trained=out.trained,
            turns=turns,
            env_s=env_s,
            end_reason="done",
        )

    def _env_latency(self, episodes: SimulatedEpisodes) -> float:
        if episodes.env_latency_s <= 0:
            return 0.0
        sigma = episodes.latency_jitter
        # Lognormal with mean env_latency_s.
        return episodes.env_latency_s * math.exp(self._rng.gauss(-(sigma**2) / 2, sigma))
