"""`reasoning_gym`: any procedural dataset of the reasoning-gym library, scored by its own
`score_answer`.

`task.dataset` names the generator and `task.dataset_config` holds its options (for example
`chain_sum` with `min_terms`, `max_digits`...). The dataset is generated once, offline and
seeded by `task.seed`, with `task.dataset_size` items; the held-out split is by question, so
a question the generator repeats is either always trained on or never.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError, MissingDependencyError
from sdp_cli.tasks.base import Prompt
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.records import RecordSplit

DEFAULT_TEMPLATE = "{question}"


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def create_dataset(name: str, options: Mapping[str, Any], *, seed: int, size: int) -> Any:
    """The reasoning-gym dataset `name`; unknown names and options are config errors."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise MissingDependencyError(
            "task=reasoning_gym needs the 'reasoning-gym' package: pip install reasoning-gym"
        ) from exc
    if name not in dataset_names():
        raise ConfigError(
            "task.dataset",
            f"reasoning-gym has no dataset '{name}'",
            "use one of its datasets, e.g. chain_sum, basic_arithmetic, leg_counting "
            "(python -c 'import reasoning_gym.factory as f; print(sorted(f.DATASETS))')",
        )
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **dict(options))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            "task.dataset_config",
            f"reasoning-gym dataset '{name}' refuses the options {dict(options)}: {exc}",
            "use the fields of its config class (reasoning_gym.factory.DATASETS[name][1])",
        ) from None


def check_reasoning_gym_config(cfg: TaskConfig) -> str:
    """The dataset name and options, checked by generating one item (for `--dry-run`)."""
    if not cfg.dataset:
        raise ConfigError("task.dataset", "the reasoning_gym task needs a dataset name")
    dataset = create_dataset(cfg.dataset, dict(cfg.dataset_config), seed=cfg.seed, size=1)
    try:
        dataset[0]
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            "task.dataset_config",
            f"reasoning-gym dataset '{cfg.dataset}' cannot generate with {dict(cfg.dataset_config)}"
            f": {exc}",
        ) from None
    return f"reasoning-gym dataset {cfg.dataset} generates with {dict(cfg.dataset_config)}"


ANSWER_EXTRACTS = ("tags", "last_number")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_of(completion_text: str, extract: str = "tags") -> str:
    """The answer a completion gives: inside <answer>...</answer> when it uses the tags
    (reasoning-gym's convention), else the whole stripped text; with `last_number`, the last
    number in that (for numeric datasets, where a small model wraps the number in a sentence)."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(completion_text)
    answer = (tagged if tagged is not None else completion_text).strip()
    if extract == "last_number":
        numbers = _NUMBER.findall(answer.replace(",", ""))
        return numbers[-1] if numbers else ""
    return answer


class ReasoningGymTask:
    name = "reasoning_gym"

    def __init__(
        self,
        dataset_name: str,
        options: Mapping[str, Any],
        prompt_format: PromptFormat,
        *,
        seed: int = 0,
        size: int = 5000,
        eval_fraction: float = 0.1,
        template: str = DEFAULT_TEMPLATE,
        answer_extract: str = "tags",
    ) -> None:
        if answer_extract not in ANSWER_EXTRACTS:
            raise ConfigError(
                "task.answer_extract",
                f"'{answer_extract}' is not a way to extract an answer",
                f"use one of {', '.join(ANSWER_EXTRACTS)}",
            )
        self.dataset_name = dataset_name
        self._answer_extract = answer_extract
        self._dataset = create_dataset(dataset_name, options, seed=seed, size=size)
        # Generated once: the split needs every question, and rewards look entries up.
        self._entries = [self._dataset[i] for i in range(size)]
        self._format = prompt_format
        self.stop_token_ids = prompt_format.stop_token_ids()
        self._template = template
        self._split = RecordSplit(
            f"{self.name}:{dataset_name}",
            [entry["question"] for entry in self._entries],
            seed=seed,
            eval_fraction=eval_fraction,
        )

    @classmethod
    def from_config(cls, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> ReasoningGymTask:
        if not cfg.dataset:
            raise ConfigError("task.dataset", "the reasoning_gym task needs a dataset name")
        return cls(
            cfg.dataset,
            dict(cfg.dataset_config),
            PromptFormat.from_config(cfg, tokenizer),
            seed=cfg.seed,
            size=cfg.dataset_size,
            eval_fraction=cfg.eval_fraction,
            template=cfg.prompt_template or DEFAULT_TEMPLATE,
            answer_extract=cfg.answer_extract,
        )

    def _prompt(self, index: int) -> Prompt:
        entry = self._entries[index]
        question = self._template.format(question=entry["question"])
        text, ids = self._format.encode(question)
        meta = {"answer": str(entry["answer"]), "index": index, "dataset": self.dataset_name}
        return Prompt(text, ids, meta, question=question)

    def sample_prompt(self, position: int) -> Prompt:
        return self._prompt(self._split.train_index(position))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(index) for index in self._split.eval_indices(n)]

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        entry = self._entries[int(meta["index"])]
        answer = answer_of(completion_text, self._answer_extract)
        score = float(self._dataset.score_answer(answer, entry))
        return min(1.0, max(0.0, score))
