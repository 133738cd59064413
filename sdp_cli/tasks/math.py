"""`math_jsonl`: question/answer records from a local JSONL or Parquet file (read with Hugging
Face `datasets`), verified with `math-verify`.

The reference may be a bare answer or GSM8K's "reasoning #### 42". A completion's answer is what
follows its last '####' when it has one, else what math-verify finds in it (the last \\boxed{}
or, without one, the last expression); it is right when math-verify finds it equal to the
reference, so "1,000" and "1000", "0.5" and "\\frac{1}{2}" match.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.records import RecordSplit

BUILTIN_PREFIX = "builtin:"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_TEMPLATE = "question: {question}\nanswer:"
CHAT_TEMPLATE = "{question}"
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


def final_answer_text(text: str) -> str:
    """What follows the last '####', or the whole text without one."""
    return text.rsplit(_FINAL_MARKER, 1)[1] if _FINAL_MARKER in text else text


def _parse(text: str) -> list[object]:
    from math_verify import parse

    # math-verify's own timeout uses SIGALRM, which works only on the main thread; rewards are
    # computed on the executor's thread, and completions are short.
    return list(parse(text, parsing_timeout=None))  # type: ignore[arg-type]


def math_verify_reward(completion_text: str, meta: Mapping[str, Any]) -> float:
    """1.0 when math-verify finds the completion's answer equal to `meta["answer"]`."""
    from math_verify import verify

    gold = _parse(final_answer_text(str(meta["answer"])))
    got = _parse(final_answer_text(completion_text))
    if not gold or not got:
        return 0.0
    return 1.0 if verify(gold, got, timeout_seconds=None) else 0.0  # type: ignore[arg-type]


def _quiet_libraries() -> None:
    import datasets

    datasets.disable_progress_bars()
    # A file it cannot parse is reported as a ConfigError naming the line; its own error log
    # (with a traceback) would only repeat it.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    # math-verify warns on every call that its timeout is off (on purpose, see _parse).
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _file_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            "task.path",
            f"'{path}' is not a JSONL or Parquet file",
            f"use a file ending in {', '.join(FILE_FORMATS)}",
        )
    return fmt


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a local JSONL or Parquet file, through Hugging Face `datasets` (its cache
    goes to a temporary directory, so nothing is left behind)."""
    if not path.is_file():
        raise ConfigError("task.path", f"data file '{path}' not found", "set task.path=FILE.jsonl")
    fmt = _file_format(path)
    if path.stat().st_size == 0:
        raise ConfigError("task.path", f"data file '{path}' has no records")
    _quiet_libraries()
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="sdp-datasets-") as cache:
        try:
            table = load_dataset(
                fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as exc:  # datasets wraps the parser's error in its own
            if fmt == "json":
                _raise_first_bad_line(path)
            cause = exc.__cause__ or exc
            raise ConfigError("task.path", f"cannot read '{path}': {cause}") from None
        return [dict(row) for row in table]


def _raise_first_bad_line(path: Path) -> None:
    """Point at the line `datasets` could not parse (its own error names none)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise ConfigError("task.path", f"data file '{path}' has no records")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("task.path", f"{path}:{number}: not valid JSON ({exc.msg})") from None


def _field_of(row: dict[str, Any], fields: tuple[str, str], index: int, where: str) -> str:
    name = fields[index]
    if name not in row or row[name] is None:
        key = ("task.question_field", "task.answer_field")[index]
        raise ConfigError(
            "task.path",
            f"{where}: each line needs '{fields[0]}' and '{fields[1]}' keys "
            f"(it has {', '.join(sorted(row)) or 'none'})",
            f"set {key} to the file's field",
        )
    return str(row[name])


def load_records(
    path: Path, question_field: str = "question", answer_field: str = "answer"
) -> list[dict[str, str]]:
    """Question/answer records; every reference answer must be one math-verify can read."""
    rows = read_table(path)
    if not rows:
        raise ConfigError("task.path", f"data file '{path}' has no records")
    records = []
    fields = (question_field, answer_field)
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}"
        question = _field_of(row, fields, 0, where)
        answer = _field_of(row, fields, 1, where)
        if not _parse(final_answer_text(answer)):
            raise ConfigError(
                "task.path", f"{where}: the answer has no number math-verify can read: {answer!r}"
            )
        records.append({"question": question, "answer": answer})
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
    records = load_records(path, cfg.question_field, cfg.answer_field)
    check_template(cfg.prompt_template or DEFAULT_TEMPLATE)
    return f"task data {path}: {len(records)} records"


class MathJsonlTask:
    """Training prompts in a fresh seeded shuffle of the training records each epoch."""

    name = "math_jsonl"

    def __init__(
        self,
        records: list[dict[str, str]],
        prompt_format: PromptFormat,
        *,
        template: str = DEFAULT_TEMPLATE,
        seed: int = 0,
        eval_fraction: float = 0.1,
    ) -> None:
        self._records = records
        self._format = prompt_format
        self.stop_token_ids = prompt_format.stop_token_ids()
        self._template = template
        self._split = RecordSplit(
            self.name,
            [r["question"] for r in records],
            seed=seed,
            eval_fraction=eval_fraction,
        )

    @classmethod
    def from_config(cls, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> MathJsonlTask:
        if not cfg.path:
            raise ConfigError("task.path", "the math_jsonl task needs a data file")
        records = load_records(resolve_data_path(cfg.path), cfg.question_field, cfg.answer_field)
        prompt_format = PromptFormat.from_config(cfg, tokenizer)
        # A chat template makes the question the user's turn as it is; a plain-text prompt
        # needs the cue of the default template.
        default = CHAT_TEMPLATE if prompt_format.use_chat_template else DEFAULT_TEMPLATE
        check_template(cfg.prompt_template or default)
        return cls(
            records,
            prompt_format,
            template=cfg.prompt_template or default,
            seed=cfg.seed,
            eval_fraction=cfg.eval_fraction,
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def train_indices(self) -> list[int]:
        return list(self._split.train)

    def record_index(self, position: int) -> int:
        return self._split.train_index(position)

    def _prompt(self, index: int) -> Prompt:
        record = self._records[index]
        question = self._template.format(question=record["question"])
        text, ids = self._format.encode(question)
        return Prompt(text, ids, {"answer": record["answer"], "index": index}, question=question)

    def sample_prompt(self, position: int) -> Prompt:
        return self._prompt(self.record_index(position))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(index) for index in self._split.eval_indices(n)]

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return math_verify_reward(completion_text, meta)
