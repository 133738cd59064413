"""The simulator's check of proximal exactness (docs/design.md, Proximal recompute).

Every simulated logprob is a function of the token's output position and of the version of the
weights that computed it (`simulated_logprob`), as a real logprob depends on the weights: a
score taken under the wrong version, or written at the wrong position, shows in the number. The
simulated trainer hands each batch to `ProximalCheck.check`, which compares every token's p_t
with what the rule gives. In `prox_mode=segment`, a token sampled by version b has

- p_t = its logprob under b+1 when its group was in the buffer at the update from b+1 to b+2:
  accepted at executor version ≤ b+1 and trained at version ≥ b+2. The recompute, an early
  score, a continuation's prefill and an early take's write must all give that value;
- p_t = μ_t otherwise: the newest segment, the one before it when the group is trained before
  that update, and tokens whose update came while their group was still generating.

In the other modes the trainer computes p_t itself, so the rollout side must leave p_t = μ_t.
The check needs, per group, the executor's version when it was accepted; the simulated workflow
records it (`ACCEPTED_AT`) as the group leaves it, in the same loop step as the acceptance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any

from sdp_cli.config.run_plan import needs_proximal_recompute
from sdp_cli.config.train_settings import ProxMode
from sdp_cli.rollout.trajectory import RolloutGroup

# RolloutGroup.meta key: the executor's version when the group was accepted into the buffer.
ACCEPTED_AT = "simulate_accepted_at_version"
# Positions are kept modulo this power of two, so that position and version share a float exactly.
_POSITIONS = 2**20
# Violations kept as examples in the report; all of them are counted.
_EXAMPLES = 5


def simulated_logprob(position: int, version: int) -> float:
    """The logprob of the output token at `position` under the weights of `version`:
    −(1 + version + position / 2^20), an exact float from which `scored_version` reads the
    version back."""
    return -(1.0 + version + (position % _POSITIONS) / _POSITIONS)


def simulated_logprobs(start: int, stop: int, version: int) -> list[float]:
    """`simulated_logprob` of the output positions [start, stop) under `version`, the same
    floats, without a call per token (the simulator makes and checks millions)."""
    base = 1.0 + version
    return [-(base + (i % _POSITIONS) / _POSITIONS) for i in range(start, stop)]


def scored_version(logprob: float) -> int:
    """The version a simulated logprob was computed under."""
    return math.floor(-logprob) - 1


@dataclass
class Violation:
    """A trained token whose p_t is not what the rule gives."""

    step: int
    rollout_id: int
    sample: int
    position: int
    token_version: int
    # The version whose logprob the rule asks for, and the one p_t was computed under.
    expected_version: int
    got_version: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ProximalCheck:
    prox_mode: ProxMode
    checked_tokens: int = 0
    violations: int = 0
    examples: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._segment = needs_proximal_recompute(self.prox_mode)

    def check(self, batch: list[RolloutGroup], version: int, step: int) -> None:
        """Check every output token of `batch`, trained at `version` in trainer step `step`."""
        for group in batch:
            accepted_at: int = group.meta[ACCEPTED_AT]
            for index, sample in enumerate(group.samples):
                proximal = sample.proximal_logprobs()
                expected = self._expected(sample.versions, accepted_at, version)
                if sample.trained is not None:
                    # An episode's context tokens are never scored: p_t stays μ_t (0).
                    expected = [
                        e if t else p
                        for e, p, t in zip(expected, proximal, sample.trained, strict=True)
                    ]
                self.checked_tokens += sample.n_trained
                if proximal == expected:
                    continue
                for position, (got, want) in enumerate(zip(proximal, expected, strict=True)):
                    if got != want:
                        token_version = sample.versions[position]
                        self._violation(
                            Violation(
                                step=step,
                                rollout_id=group.rollout_id,
                                sample=index,
                                position=position,
                                token_version=token_version,
                                expected_version=scored_version(want),
                                got_version=scored_version(got),
                            )
                        )

    def _expected(self, versions: list[int], accepted_at: int, trained_at: int) -> list[float]:
        """The rule's p_t of every token, one run of equal versions (a segment) at a time."""
        expected: list[float] = []
        for token_version, run in groupby(versions):
            start = len(expected)
            stop = start + sum(1 for _ in run)
            scored_at = self.expected_version(token_version, accepted_at, trained_at)
            expected += simulated_logprobs(start, stop, scored_at)
        return expected

    def expected_version(self, token_version: int, accepted_at: int, trained_at: int) -> int:
        """The version whose logprob p_t must be, for a token sampled by `token_version` in a
        group accepted at `accepted_at` and trained at `trained_at`."""
        recomputed_at = token_version + 1
        if self._segment and accepted_at <= recomputed_at < trained_at:
            return recomputed_at
        return token_version

    def _violation(self, violation: Violation) -> None:
        self.violations += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(violation)

    def summary(self) -> dict[str, Any]:
        return {
            "proximal_checked_tokens": self.checked_tokens,
            "proximal_violations": self.violations,
            "proximal_violation_examples": [v.as_dict() for v in self.examples],
        }
