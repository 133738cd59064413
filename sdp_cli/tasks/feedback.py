"""`feedback`: the base task's question, answered up to `task.max_attempts` times.

After a wrong answer (a reward below 1 from the base task, `task.base`) the user says
`task.feedback_message` ("That is not correct. Try again.") and the model answers again. The
episode ends at the first correct answer or after the last attempt; its reward is the base
task's reward of the last answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdp_cli.tasks.base import Task
from sdp_cli.tasks.environment import ChatMessage, EnvStep

# Rewards in [0, 1]; an answer is correct at full reward.
CORRECT = 1.0 - 1e-9


class FeedbackEnv:
    def __init__(self, base: Task, max_attempts: int, message: str) -> None:
        self.base = base
        self.max_attempts = max_attempts
        self.message = message
        self.attempts = 0
        self.instance: Mapping[str, Any] = {}

    def reset(self, instance: Mapping[str, Any]) -> list[ChatMessage]:
        self.instance = instance
        self.attempts = 0
        return [{"role": "user", "content": str(instance["question"])}]

    def step(self, model_message: str) -> EnvStep:
        self.attempts += 1
        reward = float(self.base.reward(model_message, self.instance))
        if reward >= CORRECT or self.attempts >= self.max_attempts:
            return EnvStep([], done=True, reward=reward)
        return EnvStep([{"role": "user", "content": self.message}], done=False, reward=reward)
