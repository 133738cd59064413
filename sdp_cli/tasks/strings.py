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

import itertools
import random
from collections.abc import Callable, Mapping
from typing import Any

from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import Prompt, is_held_out, too_few_held_out
from sdp_cli.tasks.chat import PromptFormat

SEPARATOR = "="
DIGITS = "0123456789"
# Held-out strings are listed in full up to this many possible strings, drawn at random above.
_ENUMERATE_LIMIT = 200_000


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
        prompt_format: PromptFormat,
        *,
        min_len: int,
        max_len: int,
        seed: int,
        eval_fraction: float = 0.1,
    ) -> None:
        if not 1 <= min_len <= max_len:
            raise ConfigError(
                "task.min_len",
                f"need 1 <= task.min_len <= task.max_len (got {min_len} and {max_len})",
                "set task.min_len and task.max_len to a valid range, e.g. 1 and 2",
            )
        self.name = name
        self._transform = transform
        self._format = prompt_format
        self.stop_token_ids = prompt_format.stop_token_ids()
        self._min_len = min_len
        self._max_len = max_len
        self._seed = seed
        self._eval_fraction = eval_fraction

    def _held_out(self, digits: str) -> bool:
        return is_held_out(digits, self._eval_fraction, f"held-out:{self.name}:{self._seed}")

    def _random_digits(self, rng: random.Random) -> str:
        length = rng.randint(self._min_len, self._max_len)
        return "".join(rng.choice(DIGITS) for _ in range(length))

    def _digits_at(self, position: int) -> str:
        # A string seed is hashed with SHA-512 by `random`, so the stream does not depend on
        # PYTHONHASHSEED or the platform. Held-out strings are redrawn from the same generator,
        # so the stream stays a function of the position.
        rng = random.Random(f"{self.name}:{self._seed}:{position}")
        digits = self._random_digits(rng)
        while self._held_out(digits):
            digits = self._random_digits(rng)
        return digits

    def _prompt(self, digits: str) -> Prompt:
        text, ids = self._format.encode(digits + SEPARATOR)
        return Prompt(text, ids, {"target": self._transform(digits)}, question=digits + SEPARATOR)

    def sample_prompt(self, position: int) -> Prompt:
        return self._prompt(self._digits_at(position))

    def _all_strings(self) -> list[str]:
        lengths = range(self._min_len, self._max_len + 1)
        return ["".join(t) for n in lengths for t in itertools.product(DIGITS, repeat=n)]

    def _held_out_strings(self, n: int) -> list[str]:
        rng = random.Random(f"{self.name}:{self._seed}:eval")
        if sum(10**n for n in range(self._min_len, self._max_len + 1)) <= _ENUMERATE_LIMIT:
            pool = [d for d in self._all_strings() if self._held_out(d)]
            if n > len(pool):
                raise too_few_held_out(n, len(pool), self._eval_fraction)
            rng.shuffle(pool)
            return pool[:n]
        found: dict[str, None] = {}
        # Expected draws are n / eval_fraction; the cap only stops a fraction of 0.
        for _ in range(1000 * (n + 1)):
            if len(found) == n:
                return list(found)
            digits = self._random_digits(rng)
            if self._held_out(digits):
                found[digits] = None
        raise too_few_held_out(n, len(found), self._eval_fraction)

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(digits) for digits in self._held_out_strings(n)]

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return digit_string_reward(completion_text.strip(), str(meta["target"]))


def reverse_digits(text: str) -> str:
    return text[::-1]


def copy_digits(text: str) -> str:
    return text
