"""Single-turn RLVR workflow: one prompt, `n_samples` completions, each rewarded by the task.

The data position of a rollout (which prompt of the task's stream it works on) comes from the
executor's `DataPositions`, which replays the positions of rollouts that were not trained; without
one, the position is the rollout id.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Protocol

from sdp_cli.config.rollout_settings import Overlong, RolloutConfig
from sdp_cli.inference.types import Completion, Gate, SamplingParams
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.base import Prompt, Task


class Generator(Protocol):
    async def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        gate: Gate | None = None,
        score_from: int | None = None,
    ) -> Completion: ...


def overlong_penalty(n_tokens: int, rollout: RolloutConfig) -> float:
    """DAPO's soft overlong punishment, the amount taken off the reward of a completion of
    `n_tokens` with rollout.overlong=penalty (else 0): with L = rollout.max_new_tokens and a
    buffer of B = rollout.overlong_buffer tokens (at most L), factor·(n − (L − B))/B once
    n > L − B, at most the factor. It grows with the length alone, so a long answer that
    finished is nudged too, before it gets cut."""
    if Overlong(rollout.overlong) != Overlong.penalty:
        return 0.0
    limit = rollout.max_new_tokens
    buffer = min(rollout.overlong_buffer, limit)
    excess = n_tokens - (limit - buffer)
    if excess <= 0:
        return 0.0
    return rollout.overlong_penalty * min(excess / buffer, 1.0)


def stop_token_ids(eos_token_id: int | None, task_stops: Iterable[int]) -> tuple[int, ...]:
    """EOS, then the task's own stop tokens (a chat template's end-of-turn token), once each."""
    stops = [] if eos_token_id is None else [eos_token_id]
    stops += [t for t in task_stops if t not in stops]
    return tuple(stops)


def sample_seed(run_seed: int, rollout_id: int, sample_index: int) -> int:
    """A per-completion sampling seed that is stable across runs and resumes."""
    return zlib.crc32(f"{run_seed}:{rollout_id}:{sample_index}".encode()) & 0x7FFFFFFF


class RLVRWorkflow:
    def __init__(
        self,
        task: Task,
        generator: Generator,
        decode: Callable[[list[int]], str],
        rollout: RolloutConfig,
        eos_token_id: int | None,
        run_seed: int = 0,
        positions: DataPositions | None = None,
    ) -> None:
        self.task = task
        self.generator = generator
        self.decode = decode
        self.rollout = rollout
        self.stop_token_ids = stop_token_ids(eos_token_id, getattr(task, "stop_token_ids", ()))
        self.run_seed = run_seed
        # The same object the executor settles positions in (rollout/positions.py).
        self.positions = positions

    def sampling(self, rollout_id: int, sample_index: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            top_k=self.rollout.top_k,
            seed=sample_seed(self.run_seed, rollout_id, sample_index),
            stop_token_ids=self.stop_token_ids,
        )

    def to_trajectory(
        self, prompt: Prompt, completion: Completion, generate_s: float | None = None
    ) -> Trajectory:
        # The penalty goes into the reward itself, so the group's baseline and the logged
        # reward are those the advantage is computed from.
        reward = float(self.task.reward(self.decode(completion.output_ids), prompt.meta))
        reward -= overlong_penalty(len(completion.output_ids), self.rollout)
        return Trajectory(
            prompt_ids=list(prompt.prompt_ids),
            output_ids=list(completion.output_ids),
            behav_logprobs=list(completion.logprobs),
            versions=list(completion.versions),
            reward=reward,
            finish_reason=completion.finish_reason,
            n_segments=completion.n_segments,
            generate_s=generate_s,
            prefix_logprobs=completion.prefix_logprobs,
            prefix_version=completion.prefix_version,
        )

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup | None:
        position = rollout_id if self.positions is None else self.positions.position(rollout_id)
        prompt = self.task.sample_prompt(position)
        started = time.monotonic()

        async def timed_completion(index: int) -> tuple[Completion, float]:
            completion = await self.generator.generate(
                list(prompt.prompt_ids),
                self.sampling(rollout_id, index),
                self.rollout.max_new_tokens,
                gate=gate,
            )
            return completion, time.monotonic() - started

        completions = await asyncio.gather(
            *(timed_completion(index) for index in range(self.rollout.n_samples))
        )
        return RolloutGroup(
            rollout_id=rollout_id,
            samples=[self.to_trajectory(prompt, c, seconds) for c, seconds in completions],
            submit_version=executor_version,
            meta={**prompt.meta, "prompt": prompt.text, "position": position},
        )
