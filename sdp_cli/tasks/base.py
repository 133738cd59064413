"""The task interface: prompts addressed by a data position, and rewards in [0, 1].

A prompt is a pure function of its position, so a checkpoint that stores the next position
resumes the same prompt stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    text: str
    prompt_ids: list[int]
    # Whatever the reward needs (reference answer, target string...); JSON-serialisable.
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def sample_prompt(self, position: int) -> Prompt:
        """The prompt at data position `position` (any int >= 0); the same position always
        gives the same prompt."""
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


def decode_completion(tokenizer: PreTrainedTokenizerBase, output_ids: Sequence[int]) -> str:
    """The text a reward function sees: output tokens up to the first EOS, special tokens
    (and ids beyond the tokenizer's vocabulary) dropped."""
    ids = list(output_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
