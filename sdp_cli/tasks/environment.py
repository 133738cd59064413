"""The Python environment protocol of multi-turn episodes, and tasks that play one.

An environment plays one episode (a fresh object per episode, so it may keep state):

    reset(instance) -> list of messages            the first messages (usually one user message)
    step(model_message) -> (messages, done, reward) after each model turn

Messages are OpenAI chat messages, `{"role": "user" | "tool" | "system", "content": str}`. The
instance is the task's prompt at a data position: its meta (reference answer...) plus
`question`, the user message before formatting. `reward` is in [0, 1]; the episode's reward is
that of the step that ended it. Either method may be a coroutine function; a plain one runs in a
worker thread, so it never blocks the rollout loop (sdp_cli/episodes/multiturn.py).

`task.env=module:Class` plays `Class()` on the prompts of `task.name`; built-in environments
(`feedback`) are tasks of their own (sdp_cli/tasks/registry.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt, Task

ChatMessage = dict[str, Any]


@dataclass(frozen=True)
class EnvStep:
    messages: list[ChatMessage] = field(default_factory=list)
    done: bool = False
    reward: float = 0.0

    @classmethod
    def of(cls, answer: Any) -> EnvStep:
        """An environment's answer to `step`: an EnvStep or a (messages, done, reward) tuple."""
        if isinstance(answer, EnvStep):
            return answer
        try:
            messages, done, reward = answer
        except (TypeError, ValueError):
            raise TypeError(
                f"step() must return (messages, done, reward), got {type(answer).__name__}"
            ) from None
        return cls(list(messages), bool(done), float(reward))


@runtime_checkable
class Environment(Protocol):
    def reset(self, instance: Mapping[str, Any]) -> Any:
        """The first messages of an episode on `instance` (a list of messages)."""
        ...

    def step(self, model_message: str) -> Any:
        """The environment's answer to the model's turn: (messages, done, reward)."""
        ...


def instance_of(prompt: Prompt) -> dict[str, Any]:
    """What `reset` gets: the prompt's meta and its question."""
    return {**prompt.meta, "question": prompt.question or prompt.text}


class EnvTask:
    """A task whose rollouts are episodes: `base` gives the prompts (instances), the held-out
    split and the single-turn reward; `make_env()` a fresh environment per episode."""

    def __init__(self, name: str, base: Task, make_env: Callable[[], Environment]) -> None:
        self.name = name
        self.base = base
        self.make_env = make_env
        self.stop_token_ids = base.stop_token_ids

    def sample_prompt(self, position: int) -> Prompt:
        return self.base.sample_prompt(position)

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self.base.eval_prompts(n)

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return self.base.reward(completion_text, meta)


def load_env_class(dotted: str) -> Callable[[], Environment]:
    """`module:Class` (or module.Class) of a user's environment, checked to have reset/step."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            "task.env", f"'{dotted}' is not a dotted path to a class", "write it as module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: any failure is the user's module
        raise ConfigError(
            "task.env",
            f"cannot import module '{module_name}' for '{dotted}': {exc!r}",
            "check the spelling and that the module is importable (on PYTHONPATH)",
        ) from exc
    cls = getattr(module, attr, None)
    if not callable(cls) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ConfigError(
            "task.env",
            f"'{dotted}' is not a class with reset(instance) and step(model_message)",
            "see docs/design.md, Episodes, for the environment protocol",
        )
    return cls
