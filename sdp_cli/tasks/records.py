"""Tasks over a fixed list of records (a data file, a generated dataset): the held-out split
by question and the seeded training order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import is_held_out, too_few_held_out


class RecordSplit:
    """Record indices split into training and held-out by a hash of their question.

    Training positions walk a fresh seeded shuffle of the training records each epoch; the
    held-out records are deduplicated by question and kept in one seeded order, so
    `eval_indices(n)` is the same for any caller asking for the same n.
    """

    def __init__(
        self, name: str, questions: Sequence[str], *, seed: int, eval_fraction: float
    ) -> None:
        self._name = name
        self._seed = seed
        self.eval_fraction = eval_fraction
        salt = f"held-out:{name}:{seed}"
        held = [is_held_out(q, eval_fraction, salt) for q in questions]
        self.train = [i for i, h in enumerate(held) if not h]
        if not self.train:
            raise ConfigError(
                "task.eval_fraction",
                f"all {len(questions)} records of task {name} are held out for evaluation",
                "lower task.eval_fraction (or use a larger data set)",
            )
        first_of_question: dict[str, int] = {}
        for index, h in enumerate(held):
            if h:
                first_of_question.setdefault(questions[index], index)
        self.held_out = list(first_of_question.values())
        random.Random(f"{salt}:eval").shuffle(self.held_out)

    @lru_cache(maxsize=2)  # noqa: B019 - one split per task; an epoch's order is reused.
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(self.train)
        random.Random(f"{self._name}:{self._seed}:{epoch}").shuffle(order)
        return order

    def train_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.train))
        return self._epoch_order(epoch)[offset]

    def eval_indices(self, n: int) -> list[int]:
        if n > len(self.held_out):
            raise too_few_held_out(n, len(self.held_out), self.eval_fraction)
        return self.held_out[:n]
