"""Built-in toy tasks on short digit strings, learnable by the tiny random-init model on CPU.

The prompt is the digit string followed by a separator (`"31="`); the completion should be the
target string followed by EOS. The reward has L + 1 slots for a target of length L: one per
target character (1 when the completion has that character at that position) and one for the
length (min(L, n) / max(L, n) for a completion of n characters):

    reward = (# positions i with completion[i] == target[i] + min(L, n) / max(L, n)) / (L + 1)

It is dense on purpose: a random-init policy that rambles for 16 tokens already scores
differently within a group (GRPO needs that), and stopping at the right length is the first
thing it learns, before the characters themselves.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt, encode_prompt

SEPARATOR = "="
DIGITS = "0123456789"


def digit_string_reward(completion: str, target: str) -> float:
    """Per-character credit plus a length slot (module docstring), in [0, 1]."""
    if not target:
        return 1.0 if not completion else 0.0
    hits = sum(1 for got, want in zip(completion, target, strict=False) if got == want)
    n, length = len(completion), len(target)
    length_credit = min(n, length) / max(n, length)
    return (hits + length_credit) / (length + 1)


class DigitStringTask:
    """Show a random digit string, ask for `transform(string)`."""

    def __init__(
        self,
        name: str,
        transform: Callable[[str], str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        min_len: int,
        max_len: int,
        seed: int,
    ) -> None:
        if not 1 <= min_len <= max_len:
            raise ConfigError(
                "task.min_len",
                f"need 1 <= task.min_len <= task.max_len (got {min_len} and {max_len})",
                "set task.min_len and task.max_len to a valid range, e.g. 1 and 2",
            )
        self.name = name
        self._transform = transform
        self._tokenizer = tokenizer
        self._min_len = min_len
        self._max_len = max_len
        self._seed = seed

    def _digits_at(self, position: int) -> str:
        # A string seed is hashed with SHA-512 by `random`, so the stream does not depend on
        # PYTHONHASHSEED or the platform.
        rng = random.Random(f"{self.name}:{self._seed}:{position}")
        length = rng.randint(self._min_len, self._max_len)
        return "".join(rng.choice(DIGITS) for _ in range(length))

    def sample_prompt(self, position: int) -> Prompt:
        digits = self._digits_at(position)
        text = digits + SEPARATOR
        target = self._transform(digits)
        return Prompt(text, encode_prompt(self._tokenizer, text), {"target": target})

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return digit_string_reward(completion_text.strip(), str(meta["target"]))


def reverse_digits(text: str) -> str:
    return text[::-1]


def copy_digits(text: str) -> str:
    return text
