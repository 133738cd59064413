"""Tasks by name (`task.name`), and reward functions by dotted path (`task.reward_fn`)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError, SdpError
from sdp_cli.tasks.base import Prompt, Task
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.curriculum import CurriculumTask, check_curriculum_config
from sdp_cli.tasks.environment import EnvTask, load_env_class
from sdp_cli.tasks.feedback import FeedbackEnv
from sdp_cli.tasks.gym import ReasoningGymTask, check_reasoning_gym_config
from sdp_cli.tasks.levels import Schedule
from sdp_cli.tasks.math import MathJsonlTask, check_math_config
from sdp_cli.tasks.strings import DigitStringTask, copy_digits, reverse_digits
from sdp_cli.tasks.textarena_env import TextArenaEnv, TextArenaTask, check_textarena_config
from sdp_cli.tasks.tool_calc import ToolCalcEnv

RewardFn = Callable[[str, Mapping[str, Any]], float]
TaskFactory = Callable[[TaskConfig, PreTrainedTokenizerBase], Task]
# Checks a task's own inputs (data files) without a tokenizer; returns what it checked.
TaskCheck = Callable[[TaskConfig], str]


def _reverse(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return _digit_task("reverse", reverse_digits, cfg, tokenizer)


def _copy(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return _digit_task("copy", copy_digits, cfg, tokenizer)


def _digit_task(
    name: str,
    transform: Callable[[str], str],
    cfg: TaskConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> Task:
    return DigitStringTask(
        name,
        transform,
        PromptFormat.from_config(cfg, tokenizer),
        min_len=cfg.min_len,
        max_len=cfg.max_len,
        seed=cfg.seed,
        eval_fraction=cfg.eval_fraction,
    )


def _math_jsonl(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    return MathJsonlTask.from_config(cfg, tokenizer)


def _reasoning_gym(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    if cfg.curriculum.mode != "off":
        return CurriculumTask(cfg, tokenizer)
    return ReasoningGymTask.from_config(cfg, tokenizer)


def _check_reasoning_gym(cfg: TaskConfig) -> str:
    checked = check_reasoning_gym_config(cfg)
    if cfg.curriculum.mode != "off":
        checked += "; " + check_curriculum_config(cfg)
    return checked


def _base_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The single-turn task `task.base` names (built with the same task.* keys)."""
    _check_base_name(cfg.base)
    return _TASKS[cfg.base](cfg, tokenizer)


def _feedback(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    base = _base_task(cfg, tokenizer)
    return EnvTask(
        "feedback", base, lambda: FeedbackEnv(base, cfg.max_attempts, cfg.feedback_message)
    )


def _tool_calc(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    base = _base_task(cfg, tokenizer)
    return EnvTask("tool_calc", base, lambda: ToolCalcEnv(base, cfg.max_tool_calls))


def _textarena(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    stops = PromptFormat.from_config(cfg, tokenizer).stop_token_ids()
    base = TextArenaTask(cfg.game, cfg.seed, stops)
    return EnvTask("textarena", base, lambda: TextArenaEnv(cfg.game))


def _check_episode_base(cfg: TaskConfig) -> str:
    _check_base_name(cfg.base)
    checked = f"{cfg.name} over task {cfg.base}"
    if cfg.base in _CHECKS:
        checked += f" ({_CHECKS[cfg.base](cfg)})"
    return checked


_TASKS: dict[str, TaskFactory] = {
    "reverse": _reverse,
    "copy": _copy,
    "math_jsonl": _math_jsonl,
    "reasoning_gym": _reasoning_gym,
    "feedback": _feedback,
    "tool_calc": _tool_calc,
    "textarena": _textarena,
}
# Tasks whose rollouts are already episodes: not a base of another episode task.
_EPISODE_TASKS = {"feedback", "tool_calc", "textarena"}


_CHECKS: dict[str, TaskCheck] = {
    "math_jsonl": check_math_config,
    "reasoning_gym": _check_reasoning_gym,
    "feedback": _check_episode_base,
    "tool_calc": _check_episode_base,
    "textarena": check_textarena_config,
}


def register_task(
    name: str, factory: TaskFactory, check: TaskCheck | None = None, episodes: bool = False
) -> None:
    """Make `task.name=<name>` build a task with `factory(task_config, tokenizer)`; `check`, if
    given, lets `sdp train --dry-run` check its inputs before anything starts. `episodes`: the
    task is an EnvTask (multi-turn), so it cannot be `task.base`."""
    _TASKS[name] = factory
    if check is not None:
        _CHECKS[name] = check
    if episodes:
        _EPISODE_TASKS.add(name)


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
    except Exception as exc:  # an import runs arbitrary code: any failure is the user's module
        raise ConfigError(
            "task.reward_fn",
            f"cannot import module '{module_name}' for '{dotted}': {exc!r}",
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
        self.stop_token_ids = inner.stop_token_ids
        self._inner = inner
        # The curriculum, when the inner task has one, stays reachable (curriculum_of).
        self.schedule = curriculum_of(inner)
        self._reward_fn = reward_fn
        self._dotted = dotted

    def sample_prompt(self, position: int) -> Prompt:
        return self._inner.sample_prompt(position)

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self._inner.eval_prompts(n)

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        value = float(self._reward_fn(completion_text, meta))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SdpError(
                f"task.reward_fn '{self._dotted}' returned {value}; rewards must be in [0, 1]"
            )
        return value


def curriculum_of(task: Task) -> Schedule | None:
    """The level schedule of a task with `task.curriculum` on, else None."""
    schedule = getattr(task, "schedule", None)
    return schedule if isinstance(schedule, Schedule) else None


def _check_task_name(name: str) -> None:
    if name not in _TASKS:
        raise ConfigError(
            "task.name", f"unknown task '{name}'", f"use one of {', '.join(task_names())}"
        )


def _check_base_name(name: str) -> None:
    singles = sorted(set(_TASKS) - _EPISODE_TASKS)
    if name not in singles:
        raise ConfigError(
            "task.base", f"'{name}' is not a single-turn task", f"use one of {', '.join(singles)}"
        )


def check_task(cfg: TaskConfig) -> list[str]:
    """What building the task will need, checked without a tokenizer: its name, its inputs
    and `task.reward_fn`'s import. Returns what was checked."""
    _check_task_name(cfg.name)
    _check_episode_reward(cfg)
    checked = [f"task {cfg.name}"]
    if cfg.name in _CHECKS:
        checked.append(_CHECKS[cfg.name](cfg))
    if cfg.reward_fn:
        load_reward_fn(cfg.reward_fn)
        checked.append(f"task.reward_fn {cfg.reward_fn} imports")
    if cfg.env:
        _check_env(cfg)
        load_env_class(cfg.env)
        checked.append(f"task.env {cfg.env} imports")
    return checked


def _check_episode_reward(cfg: TaskConfig) -> None:
    if cfg.reward_fn and (cfg.env or cfg.name in _EPISODE_TASKS):
        raise ConfigError(
            "task.reward_fn",
            f"a multi-turn task ({cfg.env or cfg.name}) is scored by its environment",
            "remove task.reward_fn, or score in the environment's step()",
        )


def _check_env(cfg: TaskConfig) -> None:
    if cfg.name in _EPISODE_TASKS:
        raise ConfigError(
            "task.env",
            f"task {cfg.name} plays its own environment",
            "set task.env=null, or task.name to a single-turn task whose prompts the "
            "environment plays",
        )


def get_task(cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task `cfg.name`, with `cfg.reward_fn` (if set) replacing its reward."""
    _check_task_name(cfg.name)
    _check_episode_reward(cfg)
    task = _TASKS[cfg.name](cfg, tokenizer)
    if cfg.reward_fn:
        task = _CustomRewardTask(task, load_reward_fn(cfg.reward_fn), cfg.reward_fn)
    if cfg.env:
        _check_env(cfg)
        task = EnvTask(cfg.name, task, load_env_class(cfg.env))
    return task
