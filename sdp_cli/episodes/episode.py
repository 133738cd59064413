"""One episode's token ids, turn by turn, as sampled or given: never re-rendered.

The ids are the first prompt, then the turns in order. A model turn's ids are those vLLM
sampled, with their behaviour logprobs and versions; an environment turn's ids (a tool result,
feedback, the chat template's glue around a message) are context: attended to, never trained.
`Episode.to_trajectory` makes the `Trajectory` the rest of sdp trains on: output = every token
after the first prompt, `trained` = the model tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdp_cli.inference.types import Segment
from sdp_cli.rollout.trajectory import Trajectory

# OpenAI's chat roles: `assistant` is a model turn, the others are context.
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Turn:
    """One turn as `samples.jsonl` shows it."""

    role: str
    text: str
    n_tokens: int
    trained: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "text": self.text,
            "n_tokens": self.n_tokens,
            "trained": self.trained,
        }


@dataclass
class ModelTurn:
    """One model turn's sampled tokens, possibly generated in several segments (a weight update
    aborted the request and it went on under the new weights)."""

    ids: list[int] = field(default_factory=list)
    # μ_t of each token under the weights that sampled it.
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    # "stop" (a stop token), "length" (max tokens or the context), "abort" never: an aborted
    # segment continues.
    finish_reason: str = ""
    # (version, start, end) over this turn's tokens.
    segments: list[Segment] = field(default_factory=list)
    n_requests: int = 0
    generate_s: float = 0.0
    # From a continuation's prefill (rollout.score_continuations): the logprobs of the
    # episode's output tokens [0, len) under `prefix_version`; None if none brought them.
    prefix_logprobs: list[float] | None = None
    prefix_version: int | None = None


class ContextOverflow(Exception):
    """Appending would take the episode past its token limit (ends it with reason `context`)."""


class Episode:
    """The growing ids of one episode. Append-only: earlier turns never change."""

    def __init__(self, prompt_ids: list[int], max_tokens: int | None = None) -> None:
        if not prompt_ids:
            raise ValueError("an episode needs at least one prompt token (BOS)")
        self.prompt_ids = list(prompt_ids)
        # Longest the whole episode (prompt + turns) may get; None: unlimited.
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        # None at context tokens until `to_trajectory` fills them in.
        self._versions: list[int | None] = []
        self.trained: list[bool] = []
        self.turns: list[Turn] = []
        self.n_segments = 0
        self.n_requests = 0
        self.generate_s = 0.0
        self.env_s = 0.0
        self.finish_reason = ""
        self.prefix_logprobs: list[float] | None = None
        self.prefix_version: int | None = None

    # ---- reading ------------------------------------------------------------------------

    def context_ids(self) -> list[int]:
        """The exact ids so far: what the next model turn is generated after."""
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens_left(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens - len(self)

    @property
    def n_model_turns(self) -> int:
        return sum(1 for turn in self.turns if turn.trained)

    # ---- appending ----------------------------------------------------------------------

    def add_context(self, ids: list[int], role: str, text: str = "") -> None:
        """Append environment ids (a tool result, feedback, template glue): never trained.
        Raises ContextOverflow, appending nothing, when they would not fit."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        left = self.tokens_left
        if left is not None and len(ids) > left:
            raise ContextOverflow(f"{len(ids)} context tokens, {left} left of {self.max_tokens}")
        self.output_ids += ids
        self.logprobs += [0.0] * len(ids)
        self._versions += [None] * len(ids)
        self.trained += [False] * len(ids)
        self.turns.append(Turn(role, text, len(ids), trained=False))

    def add_model_turn(self, turn: ModelTurn, text: str = "") -> None:
        """Append a model turn's sampled ids exactly (trained)."""
        if not (len(turn.ids) == len(turn.logprobs) == len(turn.versions)):
            raise ValueError("a model turn needs one logprob and one version per token")
        self.output_ids += turn.ids
        self.logprobs += turn.logprobs
        self._versions += turn.versions
        self.trained += [True] * len(turn.ids)
        self.turns.append(Turn("assistant", text, len(turn.ids), trained=True))
        self.n_segments += len(turn.segments)
        self.n_requests += turn.n_requests
        self.generate_s += turn.generate_s
        self.finish_reason = turn.finish_reason
        # The newest continuation's scores, as for one completion (Completion.prefix_logprobs).
        if turn.prefix_logprobs is not None:
            self.prefix_logprobs = list(turn.prefix_logprobs)
            self.prefix_version = turn.prefix_version

    # ---- the trajectory -----------------------------------------------------------------

    def versions(self) -> list[int]:
        """Per output token: a model token's own version; a context token takes the nearest
        model token's (the one before it, else the one after; 0 if there is none), so that
        versions stay within [head, tail]."""
        filled: list[int] = []
        last: int | None = None
        for version in self._versions:
            last = version if version is not None else last
            filled.append(-1 if last is None else last)
        first = next((v for v in self._versions if v is not None), 0)
        return [first if v == -1 else v for v in filled]

    def to_trajectory(self, reward: float, end_reason: str) -> Trajectory:
        return Trajectory(
            prompt_ids=list(self.prompt_ids),
            output_ids=list(self.output_ids),
            behav_logprobs=list(self.logprobs),
            versions=self.versions(),
            reward=reward,
            n_segments=max(1, self.n_segments),
            generate_s=self.generate_s,
            finish_reason=self.finish_reason,
            trained=list(self.trained),
            turns=[turn.as_dict() for turn in self.turns],
            env_s=self.env_s,
            end_reason=end_reason,
            prefix_logprobs=self.prefix_logprobs,
            prefix_version=self.prefix_version,
        )
