"""Tasks: prompts addressed by a data position and rewards in [0, 1] (built-in digit-string
tasks, GSM8K-style JSONL math), selected by `task.name`."""

from sdp_cli.tasks.base import Prompt, Task, decode_completion, encode_prompt
from sdp_cli.tasks.registry import check_task, get_task, load_reward_fn, register_task, task_names
from sdp_cli.tasks.tokenizer import load_tokenizer

__all__ = [
    "Prompt",
    "Task",
    "check_task",
    "decode_completion",
    "encode_prompt",
    "get_task",
    "load_reward_fn",
    "load_tokenizer",
    "register_task",
    "task_names",
]
