"""The `task.*` keys: prompts and rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdp_cli.config.setting import setting

CURRICULUM_MODES = ("off", "step", "reward")


@dataclass
class CurriculumConfig:
    """The `task.curriculum.*` keys: training prompts that get harder as the run goes (the
    reasoning_gym task, through the dataset's own reasoning-gym curriculum). Held-out
    evaluation stays on `task.dataset_config`, the target difficulty."""

    mode: str = setting(
        "off",
        choices=CURRICULUM_MODES,
        help="off; step: one level up every `every_steps` steps; reward: one level up when the "
        "mean training reward of the last `window` steps at a level reaches `reward_threshold`",
    )
    attributes: list[str] = setting(
        factory=lambda: ["num_terms"],
        help="reasoning_gym: the curriculum attributes a level sets (chain_sum: num_terms, "
        "num_digits); level k is the attribute's k-th value, e.g. num_terms 0: 2 terms, 1: 3",
    )
    start_level: int = setting(0, ge=0, help="the level of the first training prompts")
    end_level: int = setting(
        1, ge=0, help="the highest level (>= start_level, within every attribute's levels)"
    )
    every_steps: int = setting(20, ge=1, help="step mode: training steps per level")
    reward_threshold: float = setting(
        0.7, gt=0, le=1, help="reward mode: the mean training reward that moves a level up"
    )
    window: int = setting(
        10, ge=1, help="reward mode: steps at a level whose mean reward is compared"
    )


@dataclass
class TaskConfig:
    name: str = setting(
        "reverse",
        help="task: reverse, copy, math_jsonl, reasoning_gym; multi-turn: feedback, tool_calc, "
        "textarena; or a registered one",
    )
    path: str | None = setting(
        None, help="data file of a file-based task (builtin:math_small is bundled)"
    )
    reward_fn: str | None = setting(
        None, help="module:function (or module.function) replacing the task's reward"
    )
    seed: int = setting(0, help="seed of the prompt stream")
    min_len: int = setting(1, ge=1, help="reverse/copy: shortest digit string")
    max_len: int = setting(2, ge=1, help="reverse/copy: longest digit string (>= min_len)")
    prompt_template: str | None = setting(
        None,
        help="math_jsonl, reasoning_gym: prompt with a {question} field; null: the task's default",
    )
    chat_template: str = setting(
        "auto",
        help="format prompts with the tokenizer's chat template: auto (when it has one), true, "
        "false",
    )
    system_prompt: str | None = setting(
        None, help="system message of the chat (a first line without a template); null: none"
    )
    eval_fraction: float = setting(
        0.1,
        ge=0,
        lt=1,
        help="part of the distinct questions held out for evaluation, never trained on",
    )
    question_field: str = setting("question", help="math_jsonl: the question's field in the file")
    answer_field: str = setting("answer", help="math_jsonl: the reference answer's field")
    dataset: str | None = setting(None, help="reasoning_gym: the dataset name, e.g. chain_sum")
    dataset_config: dict[str, Any] = setting(
        factory=dict, help="reasoning_gym: the dataset's generator options"
    )
    dataset_size: int = setting(
        5000, ge=1, help="reasoning_gym: items generated (offline, seeded by task.seed)"
    )
    answer_extract: str = setting(
        "tags",
        choices=("tags", "last_number"),
        help="reasoning_gym: what score_answer gets: tags (<answer>...</answer>, else the "
        "whole completion) or last_number (the last number in it)",
    )
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    env: str | None = setting(
        None,
        help="module:Class of a multi-turn environment (reset(instance) -> messages, "
        "step(model_message) -> (messages, done, reward)) played on task.name's prompts; "
        "null: none",
    )
    base: str = setting(
        "reasoning_gym",
        help="feedback, tool_calc: the task whose prompts are asked and whose reward scores the "
        "answer",
    )
    max_attempts: int = setting(
        3, ge=1, help="feedback: answers the model may give (a wrong one gets the feedback)"
    )
    feedback_message: str = setting(
        "That is not correct. Try again.",
        help="feedback: the user message after a wrong answer",
    )
    max_tool_calls: int = setting(
        3, ge=0, help="tool_calc: calculator calls per episode; the turn after the last is scored"
    )
    game: str = setting(
        "GuessTheNumber-v0", help="textarena: the single-player TextArena game (ta.make id)"
    )
    env_timeout_s: float = setting(
        30.0,
        gt=0,
        help="longest an environment's reset or step (a tool call) may take; past it the "
        "episode's rollout is rejected",
    )
    agent: str | None = setting(
        None,
        help="module:function of an agent program played through the OpenAI-compatible gateway "
        "on task.name's prompts: await function(base_url, model_name, instance) -> reward in "
        "[0, 1], or None to let the task score its last answer; null: none",
    )
    agent_timeout_s: float = setting(
        600.0,
        gt=0,
        help="longest one agent episode may take (all its model calls included); past it the "
        "episode's rollout is rejected",
    )
