"""How a key is declared: `setting(...)` gives a dataclass field its default, bounds or allowed
values and one line of help (a `Rule`). `validate.py` checks every rule, and `sdp config show
--explain` and the key table print them, so a constraint is written once, beside its field.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from enum import Enum
from typing import Any

RULE = "sdp_rule"


@dataclass(frozen=True)
class Rule:
    """What one key accepts. A null value of an optional key always passes: null disables it."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    # Why a value outside the bounds is refused, when the bound alone does not say it.
    why: str = ""

    def bounds(self) -> str:
        """The bounds in words, e.g. `>= 0 and < 1`; empty when there are none."""
        return " and ".join(
            f"{sign} {_number(bound)}"
            for sign, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        )

    def allowed(self) -> str:
        """`one of a, b`, `a value >= 0 and < 1`, or empty when any value of the type is."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return f"a value {self.bounds()}" if self.bounds() else ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, Sequence) and not isinstance(value, str):
            # A list key: every element must be allowed.
            return all(self.accepts(element) for element in value)
        if self.choices is not None:
            return str(value) in self.choices
        checks = (
            (self.ge, operator.ge),
            (self.gt, operator.gt),
            (self.le, operator.le),
            (self.lt, operator.lt),
        )
        return all(bound is None or compare(value, bound) for bound, compare in checks)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(
    default: Any = MISSING,
    *,
    help: str,
    factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    why: str = "",
) -> Any:
    """A config key: its default (or `factory` for a list), its bounds and its help. An enum
    default makes the enum's values the allowed ones."""
    if choices is None and isinstance(default, Enum):
        choices = tuple(member.value for member in type(default))
    rule = Rule(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=choices, why=why)
    if factory is not MISSING:
        return field(default_factory=factory, metadata={RULE: rule})
    return field(default=default, metadata={RULE: rule})
