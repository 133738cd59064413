"""Tasks: prompts addressed by a data position, held-out prompts for evaluation and rewards in
[0, 1] (built-in digit-string tasks, math files verified with math-verify, reasoning-gym
datasets), selected by `task.name`; prompts go through the model's chat template when it has
one."""

from sdp_cli.tasks.base import Prompt, Task, decode_completion, encode_prompt
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.levels import CurriculumState, LevelChange, Schedule
from sdp_cli.tasks.registry import (
    check_task,
    curriculum_of,
    get_task,
    load_reward_fn,
    register_task,
    task_names,
)
from sdp_cli.tasks.tokenizer import load_tokenizer

__all__ = [
    "CurriculumState",
    "LevelChange",
    "Prompt",
    "PromptFormat",
    "Schedule",
    "Task",
    "check_task",
    "curriculum_of",
    "decode_completion",
    "encode_prompt",
    "get_task",
    "load_reward_fn",
    "load_tokenizer",
    "register_task",
    "task_names",
]
