"""`math_jsonl`: GSM8K-style lines {"question": ..., "answer": ...} with a numeric verifier.

The answer may be a bare number or GSM8K's "reasoning #### 42". A completion is right when the
number after its last '####' (or, without one, its last number) equals the reference
numerically, so "1,000", "1000.0" and "1000" all match.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.schema import TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt, encode_prompt

BUILTIN_PREFIX = "builtin:"
DEFAULT_TEMPLATE = "question: {question}\nanswer:"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FINAL_MARKER = "####"
_REL_TOLERANCE = 1e-6


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The number after the last '####', else the last number in `text`; None if none."""
    if _FINAL_MARKER in text:
        tail = text.rsplit(_FINAL_MARKER, 1)[1]
        match = _NUMBER.search(tail)
        return parse_number(match.group()) if match else None
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def numbers_match(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return False
    return abs(got - want) <= _REL_TOLERANCE * max(1.0, abs(want))


def numeric_reward(completion_text: str, meta: Mapping[str, Any]) -> float:
    """1.0 when the completion's final number equals `meta["answer"]`, else 0.0."""
    want = extract_answer(str(meta["answer"]))
    return 1.0 if numbers_match(extract_answer(completion_text), want) else 0.0


def resolve_data_path(path: str) -> Path:
    """A file path, or `builtin:NAME` for `sdp_cli/tasks/data/NAME.jsonl`."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        return Path(str(resources.files("sdp_cli.tasks") / "data" / f"{name}.jsonl"))
    return Path(path).expanduser()


def _record(line: str, where: str) -> dict[str, str]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError("task.path", f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(item, dict) or "question" not in item or "answer" not in item:
        raise ConfigError("task.path", f"{where}: each line needs 'question' and 'answer' keys")
    if extract_answer(str(item["answer"])) is None:
        raise ConfigError("task.path", f"{where}: the answer has no number")
    return {"question": str(item["question"]), "answer": str(item["answer"])}


def load_records(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError("task.path", f"data file '{path}' not found", "set task.path=FILE.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [
        _record(line, f"{path}:{number}")
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not records:
        raise ConfigError("task.path", f"data file '{path}' has no records")
    return records


def check_template(template: str) -> None:
    """A template must format with a question alone (a stray `{answer}` would fail mid-run)."""
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            "task.prompt_template",
            f"cannot format {template!r} with a question: {exc!r}",
            "use {question} as its only field (double other braces: {{ }})",
        ) from None


def check_math_config(cfg: TaskConfig) -> str:
    """Everything math_jsonl needs, checked without a tokenizer: the data file, each of its
    lines and the template. Returns what was checked, for `sdp train --dry-run`."""
    if not cfg.path:
        raise ConfigError("task.path", "the math_jsonl task needs a data file")
    path = resolve_data_path(cfg.path)
    records = load_records(path)
    check_template(cfg.prompt_template or DEFAULT_TEMPLATE)
    return f"task data {path}: {len(records)} records"


class MathJsonlTask:
    """Prompts in a fresh seeded shuffle of the file each epoch."""

    name = "math_jsonl"

    def __init__(
        self,
        records: list[dict[str, str]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str = DEFAULT_TEMPLATE,
        seed: int = 0,
    ) -> None:
        self._records = records
        self._tokenizer = tokenizer
        self._template = template
        self._seed = seed

    @classmethod
    def from_config(cls, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> MathJsonlTask:
        if not cfg.path:
            raise ConfigError("task.path", "the math_jsonl task needs a data file")
        check_template(cfg.prompt_template or DEFAULT_TEMPLATE)
        return cls(
            load_records(resolve_data_path(cfg.path)),
            tokenizer,
            template=cfg.prompt_template or DEFAULT_TEMPLATE,
            seed=cfg.seed,
        )

    def __len__(self) -> int:
        return len(self._records)

    @lru_cache(maxsize=2)  # noqa: B019 - one task per run; the order of an epoch is reused.
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        random.Random(f"{self.name}:{self._seed}:{epoch}").shuffle(order)
        return order

    def record_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self._records))
        return self._epoch_order(epoch)[offset]

    def sample_prompt(self, position: int) -> Prompt:
        index = self.record_index(position)
        record = self._records[index]
        text = self._template.format(question=record["question"])
        meta = {"answer": record["answer"], "index": index}
        return Prompt(text, encode_prompt(self._tokenizer, text), meta)

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return numeric_reward(completion_text, meta)
