"""The task interface: prompts addressed by a data position, held-out prompts for evaluation,
and rewards in [0, 1].

A prompt is a pure function of its position, so a checkpoint that stores the next position
resumes the same prompt stream. Every task sets aside a held-out part of its prompts (chosen by
a hash of the question, so a question asked twice lands on the same side): training never sees
it, `eval_prompts(n)` draws only from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from sdp_cli.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str
    prompt_ids: list[int]
    # Whatever the reward needs (reference answer, target string...); JSON-serialisable.
    meta: dict[str, Any] = field(default_factory=dict)
    # The user message before formatting (template applied, no chat template or system
    # prompt): what an environment's first message says; "" when the task does not say.
    question: str = ""


@runtime_checkable
class Task(Protocol):
    name: str
    # Token ids that end a completion: EOS and, with a chat template, its end-of-turn token.
    stop_token_ids: tuple[int, ...]

    def sample_prompt(self, position: int) -> Prompt:
        """The training prompt at data position `position` (any int >= 0); the same position
        always gives the same prompt, and never a held-out one."""
        ...

    def eval_prompts(self, n: int) -> list[Prompt]:
        """`n` distinct held-out prompts, the same ones on every call (ConfigError naming
        task.eval_fraction when the held-out part has fewer)."""
        ...

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        """Score a decoded completion (EOS and special tokens removed) in [0, 1]."""
        ...


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, starting with BOS when the tokenizer has one.

    Some tokenizers add BOS themselves and some (the built-in character tokenizer) do not; the
    model was trained with it either way, so make sure it is there exactly once.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def decode_completion(
    tokenizer: PreTrainedTokenizerBase,
    output_ids: Sequence[int],
    stop_token_ids: Sequence[int] = (),
) -> str:
    """The text a reward function sees: output tokens up to the first EOS or stop token,
    special tokens (and ids beyond the tokenizer's vocabulary) dropped."""
    ids = list(output_ids)
    stops = set(stop_token_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def is_held_out(question: str, fraction: float, salt: str) -> bool:
    """Whether `question` belongs to the held-out part: a hash of it, uniform in [0, 1), is
    below `fraction`. SHA-256, so the split is the same on every machine and Python."""
    digest = hashlib.sha256(f"{salt}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def too_few_held_out(n: int, available: int, fraction: float) -> ConfigError:
    return ConfigError(
        "task.eval_fraction",
        f"{n} held-out prompts asked for, but the held-out part ({fraction:g} of the task's "
        f"distinct questions) has only {available}",
        "raise task.eval_fraction, or ask for fewer evaluation prompts",
    )
