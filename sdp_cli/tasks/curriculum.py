"""`task.curriculum`: training prompts that get harder as the run goes.

A level is a difficulty of the reasoning_gym dataset, set through the dataset's own
reasoning-gym curriculum (`reasoning_gym.create_curriculum`): level k gives each attribute in
`task.curriculum.attributes` its k-th value (chain_sum `num_terms` 0: 2 terms, 1: 3 terms...).
The level rises with the step (`mode=step`) or with the training reward (`mode=reward`).

Resume safety: a prompt is still a pure function of its data position. The schedule records
each change as (step, position, level): positions from `position` on get `level`. Positions
handed out before a change keep the level they had, so a rollout replayed after a resume gets
the same prompt; the changes (and the reward window of `mode=reward`) go into the checkpoint,
and each change is a `curriculum` event.

Held-out evaluation stays on `task.dataset_config`, the target difficulty; a question held out
there is held out at every level too (the split hashes the question with the same salt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import CurriculumConfig, TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.gym import DEFAULT_TEMPLATE, ReasoningGymTask
from sdp_cli.tasks.levels import Schedule

RANGE_MODE = "upper_bound"


def level_options(
    dataset: str, options: Mapping[str, Any], cfg: CurriculumConfig, level: int
) -> dict[str, Any]:
    """`options` (task.dataset_config) with the fields of each curriculum attribute set to
    its value at `level`, by the dataset's reasoning-gym curriculum."""
    from reasoning_gym.coaching.attributes import RangeAttributeDefinition
    from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode
    from reasoning_gym.factory import CURRICULA, create_curriculum

    if dataset not in CURRICULA:
        raise ConfigError(
            "task.curriculum.mode",
            f"reasoning-gym dataset '{dataset}' has no curriculum",
            f"set task.curriculum.mode=off, or use one of {', '.join(sorted(CURRICULA))}",
        )
    curriculum = create_curriculum(dataset)
    context = DefaultCurriculumContext(RangeAttributeMode(RANGE_MODE))
    result = dict(options)
    for name in cfg.attributes:
        attribute = _attribute(curriculum, dataset, name, level)
        curriculum.set_attr_level(name, level)
        value = context.get_attr_value(curriculum, attribute)
        if isinstance(attribute, RangeAttributeDefinition):
            values = list(value) if isinstance(value, list | tuple) else [value]
            result[attribute.lower_field_name] = min(values)
            result[attribute.upper_field_name] = max(values)
        else:
            result[attribute.field_name] = value
    return result


def _attribute(curriculum: Any, dataset: str, name: str, level: int) -> Any:
    if name not in curriculum.attributes:
        raise ConfigError(
            "task.curriculum.attributes",
            f"the {dataset} curriculum has no attribute '{name}'",
            f"use some of {', '.join(curriculum.attributes)}",
        )
    attribute = curriculum.attributes[name]
    if level >= len(attribute.levels):
        raise ConfigError(
            "task.curriculum.end_level",
            f"the {dataset} attribute '{name}' has levels 0 to {len(attribute.levels) - 1} "
            f"(values {attribute.levels}), not {level}",
            f"set task.curriculum.end_level to at most {len(attribute.levels) - 1}",
        )
    return attribute


class CurriculumTask:
    """The reasoning_gym task at the target difficulty (held-out prompts, `name`) and one task
    per level (training prompts); rewards go to the task the prompt came from."""

    name = "reasoning_gym"

    def __init__(self, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.target = ReasoningGymTask.from_config(cfg, tokenizer)
        self.stop_token_ids = self.target.stop_token_ids
        self.schedule = Schedule(cfg.curriculum)
        curriculum = cfg.curriculum
        dataset = str(cfg.dataset)
        prompt_format = PromptFormat.from_config(cfg, tokenizer)
        self.levels = {
            level: ReasoningGymTask(
                dataset,
                level_options(dataset, dict(cfg.dataset_config), curriculum, level),
                prompt_format,
                seed=cfg.seed,
                size=cfg.dataset_size,
                eval_fraction=cfg.eval_fraction,
                template=cfg.prompt_template or DEFAULT_TEMPLATE,
                answer_extract=cfg.answer_extract,
            )
            for level in range(curriculum.start_level, curriculum.end_level + 1)
        }

    def sample_prompt(self, position: int) -> Prompt:
        level = self.schedule.level_at(position)
        prompt = self.levels[level].sample_prompt(position)
        return Prompt(prompt.text, prompt.prompt_ids, {**prompt.meta, "level": level})

    def eval_prompts(self, n: int) -> list[Prompt]:
        return self.target.eval_prompts(n)

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        level = meta.get("level")
        task = self.target if level is None else self.levels[int(level)]
        return task.reward(completion_text, meta)


def check_curriculum_config(cfg: TaskConfig) -> str:
    """Every level's options, built and generated once (for `--dry-run`)."""
    from sdp_cli.tasks.gym import create_dataset

    curriculum = cfg.curriculum
    described = []
    for level in range(curriculum.start_level, curriculum.end_level + 1):
        options = level_options(str(cfg.dataset), dict(cfg.dataset_config), curriculum, level)
        dataset = create_dataset(str(cfg.dataset), options, seed=cfg.seed, size=1)
        dataset[0]
        described.append(f"{level}: {options}")
    return f"curriculum ({curriculum.mode}) levels " + "; ".join(described)
