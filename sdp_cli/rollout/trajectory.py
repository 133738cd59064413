"""The sample types that flow from the workflow through the executor to the trainer.

A `Trajectory` is one completion; a `RolloutGroup` is the `n_samples` completions of one prompt.
Capacity, acceptance and staleness are decided per group (docs/design.md, Words).

An episode (many turns, sdp_cli/episodes) is a `Trajectory` too: its output holds every token
after the first prompt, model and environment turns alike, and `trained` says which are model
tokens. Context tokens (environment, tool, template) are never trained; their logprob is 0 and
their version that of the nearest model token, so that a reader that ignores the mask still sees
versions within [head, tail]. Head, tail and lag are over the model tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NOT_RECOMPUTED = -1


@dataclass
class Trajectory:
    prompt_ids: list[int]
    output_ids: list[int]
    # μ_t: logprob of each output token under the weights that sampled it.
    behav_logprobs: list[float]
    # Version of the weights that sampled each output token.
    versions: list[int]
    # p_t per output token after a proximal recompute; None means p = μ everywhere.
    prox_logprobs: list[float] | None = None
    # Version under which prox_logprobs were recomputed; NOT_RECOMPUTED if never.
    recompute_version: int = NOT_RECOMPUTED
    reward: float = 0.0
    # Number of segments (runs of tokens under one version) the completion was generated in.
    n_segments: int = 1
    # Seconds from the rollout's start until this completion's last token; None if not timed.
    generate_s: float | None = None
    # Logprobs of output tokens [0, len(prefix_logprobs)) under the weights of
    # `prefix_version`, which the prefill of the completion's last continuation computed:
    # the proximal recompute under that version takes them instead of scoring the sample.
    prefix_logprobs: list[float] | None = None
    prefix_version: int | None = None
    # Why generation ended, as the server said: "stop" (a stop token), "length" (cut at
    # rollout.max_new_tokens or the context); "" when not known.
    finish_reason: str = ""
    # Per output token, whether it is trained (a model token); None means every one is.
    trained: list[bool] | None = None
    # An episode's turns as `{role, text, n_tokens, trained}` (OpenAI roles), for people.
    turns: list[dict[str, Any]] | None = None
    # Seconds an episode's environment spent (tools, feedback), apart from generation.
    env_s: float | None = None
    # Why an episode ended ("done", "max_turns", "context", "budget"); "" for one completion.
    end_reason: str = ""

    def __post_init__(self) -> None:
        n = len(self.output_ids)
        if len(self.behav_logprobs) != n or len(self.versions) != n:
            raise ValueError(
                f"trajectory lengths differ: {n} ids, {len(self.behav_logprobs)} logprobs, "
                f"{len(self.versions)} versions"
            )
        if self.prox_logprobs is not None and len(self.prox_logprobs) != n:
            raise ValueError("prox_logprobs must have one entry per output token")
        if self.trained is not None and len(self.trained) != n:
            raise ValueError("trained must have one entry per output token")

    def is_trained(self, index: int) -> bool:
        """Whether output token `index` is a model token (trained)."""
        return self.trained is None or self.trained[index]

    def model_versions(self) -> list[int]:
        """Versions of the model tokens (all output tokens of a single completion)."""
        if self.trained is None:
            return list(self.versions)
        return [v for v, t in zip(self.versions, self.trained, strict=True) if t]

    @property
    def n_trained(self) -> int:
        """Tokens the loss sees."""
        return len(self.output_ids) if self.trained is None else sum(self.trained)

    @property
    def truncated(self) -> bool:
        """Cut at the length limit before it finished (rollout.overlong=filter leaves it out)."""
        return self.finish_reason == "length"

    @property
    def head_version(self) -> int | None:
        """Oldest version among the model tokens (None for an empty completion)."""
        versions = self.model_versions()
        return min(versions) if versions else None

    @property
    def tail_version(self) -> int | None:
        """Newest version among the model tokens."""
        versions = self.model_versions()
        return max(versions) if versions else None

    def proximal_logprobs(self) -> list[float]:
        return (
            list(self.prox_logprobs)
            if self.prox_logprobs is not None
            else list(self.behav_logprobs)
        )


@dataclass
class RolloutGroup:
    rollout_id: int
    samples: list[Trajectory]
    # Version the executor was at when the rollout was submitted.
    submit_version: int = 0
    # Task data (prompt text, reference answer...) the reward function needs.
    meta: dict[str, Any] = field(default_factory=dict)

    def _all_versions(self) -> list[int]:
        return [v for s in self.samples for v in s.model_versions()]

    @property
    def head_version(self) -> int | None:
        versions = self._all_versions()
        return min(versions) if versions else None

    @property
    def tail_version(self) -> int | None:
        versions = self._all_versions()
        return max(versions) if versions else None

    @property
    def recompute_version(self) -> int:
        """Newest recompute among the samples; NOT_RECOMPUTED if no token was ever recomputed."""
        return max((s.recompute_version for s in self.samples), default=NOT_RECOMPUTED)

    def head_lag(self, version: int) -> int:
        head = self.head_version
        return 0 if head is None else version - head

    def tail_lag(self, version: int) -> int:
        tail = self.tail_version
        return 0 if tail is None else version - tail

    def tokens_by_lag(self, version: int) -> dict[int, int]:
        counts: dict[int, int] = {}
        for v in self._all_versions():
            counts[version - v] = counts.get(version - v, 0) + 1
        return counts

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]
