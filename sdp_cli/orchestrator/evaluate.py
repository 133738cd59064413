"""Held-out evaluation: the task's held-out prompts, generated on the training servers.

Evaluation requests go straight to the inference client, not through the rollout executor, so
they take no staleness capacity and are never trained on. The training loop runs an evaluation
between two weight updates, so every completion is made by the one version it reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdp_cli.config.eval_settings import EvalConfig
from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.episodes.multiturn import MultiTurnWorkflow
from sdp_cli.errors import EpisodeRejected
from sdp_cli.inference.types import SamplingParams
from sdp_cli.rollout.rlvr import Generator, sample_seed
from sdp_cli.tasks.base import Prompt, Task

# A completion counts as correct when its reward reaches this (rewards are in [0, 1]).
CORRECT_REWARD = 1.0 - 1e-9


@dataclass(frozen=True)
class EvalCompletion:
    """One held-out completion (or episode), as samples.jsonl keeps it."""

    prompt_index: int
    prompt: str
    completion: str
    reward: float
    # An episode's turns ({role, text, n_tokens, trained}) and why it ended.
    turns: list[dict[str, Any]] | None = None
    end_reason: str | None = None


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    pass_at_k: float
    k: int
    mean_reward: float
    n_prompts: int
    seconds: float
    # Every completion, prompt by prompt: what the model gets right and wrong.
    completions: list[EvalCompletion] = field(default_factory=list)


def summarize_rewards(rewards_per_prompt: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(accuracy, pass@k, mean reward) of k completions per prompt: accuracy over all
    completions, pass@k the fraction of prompts with at least one correct completion."""
    flat = [reward for rewards in rewards_per_prompt for reward in rewards]
    if not flat:
        return 0.0, 0.0, 0.0
    correct = sum(reward >= CORRECT_REWARD for reward in flat)
    passed = sum(
        any(reward >= CORRECT_REWARD for reward in rewards) for rewards in rewards_per_prompt
    )
    return correct / len(flat), passed / len(rewards_per_prompt), sum(flat) / len(flat)


class Evaluator:
    def __init__(
        self,
        task: Task,
        generator: Generator,
        decode: Callable[[list[int]], str],
        settings: EvalConfig,
        rollout: RolloutConfig,
        stop_token_ids: tuple[int, ...],
        seed: int = 0,
        episodes: MultiTurnWorkflow | None = None,
    ) -> None:
        self.task = task
        # A multi-turn task: each held-out prompt is played as episodes, scored by the env.
        self.episodes = episodes
        self.generator = generator
        self.decode = decode
        self.settings = settings
        self.max_new_tokens = settings.max_new_tokens or rollout.max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.seed = seed
        # The same held-out prompts every time, so successive evaluations are comparable.
        self.prompts = task.eval_prompts(settings.n_prompts)

    def due(self, completed_steps: int) -> bool:
        every = self.settings.every
        return every > 0 and completed_steps % every == 0

    def sampling(self, prompt_index: int, sample_index: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.settings.temperature,
            seed=sample_seed(self.seed, -1 - prompt_index, sample_index),
            stop_token_ids=self.stop_token_ids,
        )

    async def _episode(
        self, episodes: MultiTurnWorkflow, index: int, prompt: Prompt, sampling: SamplingParams
    ) -> EvalCompletion:
        try:
            episode = await episodes.play(prompt, sampling, None)
        except EpisodeRejected as error:
            # The environment failed on this prompt: it counts as not solved.
            return EvalCompletion(index, prompt.text, "", 0.0, end_reason=f"rejected: {error}")
        return EvalCompletion(
            index,
            prompt.text,
            self.decode(list(episode.output_ids)),
            float(episode.reward),
            turns=episode.turns,
            end_reason=episode.end_reason,
        )

    async def _completions(self, index: int, prompt: Prompt) -> list[EvalCompletion]:
        if self.episodes is not None:
            return list(
                await asyncio.gather(
                    *(
                        self._episode(self.episodes, index, prompt, self.sampling(index, sample))
                        for sample in range(self.settings.n_samples)
                    )
                )
            )
        completions = await asyncio.gather(
            *(
                self.generator.generate(
                    list(prompt.prompt_ids), self.sampling(index, sample), self.max_new_tokens
                )
                for sample in range(self.settings.n_samples)
            )
        )
        texts = [self.decode(c.output_ids) for c in completions]
        return [
            EvalCompletion(index, prompt.text, text, float(self.task.reward(text, prompt.meta)))
            for text in texts
        ]

    async def run(self) -> EvalResult:
        started = time.monotonic()
        per_prompt = await asyncio.gather(
            *(self._completions(index, prompt) for index, prompt in enumerate(self.prompts))
        )
        rewards = [[c.reward for c in completions] for completions in per_prompt]
        accuracy, pass_at_k, mean_reward = summarize_rewards(rewards)
        return EvalResult(
            accuracy=accuracy,
            pass_at_k=pass_at_k,
            k=self.settings.n_samples,
            mean_reward=mean_reward,
            n_prompts=len(self.prompts),
            seconds=time.monotonic() - started,
            completions=[c for completions in per_prompt for c in completions],
        )
