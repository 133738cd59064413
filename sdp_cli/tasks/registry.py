"""Tasks by name (`task.name`), and reward functions by dotted path (`task.reward_fn`)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.schema import TaskConfig
from sdp_cli.errors import ConfigError, SdpError
from sdp_cli.tasks.base import Prompt, Task
from sdp_cli.tasks.math import MathJsonlTask
from sdp_cli.tasks.strings import DigitStringTask, copy_digits, reverse_digits

RewardFn = Callable[[str, Mapping[str, Any]], float]
TaskFactory = Callable[[TaskConfig, PreTrainedTokenizerBase], Task]


def _reverse(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return DigitStringTask(
        "reverse",
        reverse_digits,
        tokenizer,
        min_len=cfg.min_len,
        max_len=cfg.max_len,
        seed=cfg.seed,
    )


def _copy(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return DigitStringTask(
        "copy", copy_digits, tokenizer, min_len=cfg.min_len, max_len=cfg.max_len, seed=cfg.seed
    )


def _math_jsonl(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return MathJsonlTask.from_config(cfg, tokenizer)


_TASKS: dict[str, TaskFactory] = {
    "reverse": _reverse,
    "copy": _copy,
    "math_jsonl": _math_jsonl,
}


def register_task(name: str, factory: TaskFactory) -> None:
    """Make `task.name=<name>` build a task with `factory(task_config, tokenizer)`."""
    _TASKS[name] = factory


def task_names() -> list[str]:
    return sorted(_TASKS)


def load_reward_fn(dotted: str) -> RewardFn:
    """Import `package.module:function` or `package.module.function`."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            "task.reward_fn",
            f"'{dotted}' is not a dotted path to a function",
            "write it as package.module:function or package.module.function",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            "task.reward_fn",
            f"cannot import module '{module_name}' for '{dotted}': {exc}",
            "check the spelling and that the module is importable (on PYTHONPATH)",
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            "task.reward_fn",
            f"module '{module_name}' has no function '{attr}'",
            f"define {attr}(completion_text, meta) -> float in {module_name}",
        )
    return fn


class _CustomRewardTask:
    """A task with its reward replaced by a user function (checked to return [0, 1])."""

    def __init__(self, inner: Task, reward_fn: RewardFn, dotted: str) -> None:
        self.name = inner.name
        self._inner = inner
        self._reward_fn = reward_fn
        self._dotted = dotted

    def sample_prompt(self, position: int) -> Prompt:
        return self._inner.sample_prompt(position)

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        value = float(self._reward_fn(completion_text, meta))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SdpError(
                f"task.reward_fn '{self._dotted}' returned {value}; rewards must be in [0, 1]"
            )
        return value


def get_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task `cfg.name`, with `cfg.reward_fn` (if set) replacing its reward."""
    factory = _TASKS.get(cfg.name)
    if factory is None:
        raise ConfigError(
            "task.name", f"unknown task '{cfg.name}'", f"use one of {', '.join(task_names())}"
        )
    task = factory(cfg, tokenizer)
    if cfg.reward_fn:
        return _CustomRewardTask(task, load_reward_fn(cfg.reward_fn), cfg.reward_fn)
    return task
