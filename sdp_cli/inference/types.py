"""What goes into a generation request and what comes out of it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# Awaited before each generation segment (the executor's pause gate); returns at once unless
# generation is paused.
Gate = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one completion. Every field is sent to vLLM explicitly, because the
    servers run with `--generation-config vllm` and must not fill anything from the model."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    # None leaves sampling unseeded; a continuation segment uses seed + tokens so far, so that
    # it does not replay the random stream of the first segment.
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def request_fields(
        self, max_tokens: int, tokens_so_far: int, score_prefix: bool = False
    ) -> dict[str, Any]:
        """The `sampling_params` object of a /inference/v1/generate request for a segment that
        continues after `tokens_so_far` output tokens and may add `max_tokens` more;
        `score_prefix` asks for the logprobs of the request's own tokens too."""
        return {
            "n": 1,
            "max_tokens": max_tokens,
            "min_tokens": max(0, min(self.min_tokens - tokens_so_far, max_tokens)),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": None if self.seed is None else self.seed + tokens_so_far,
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logprobs": 0,
            "prompt_logprobs": 0 if score_prefix else None,
            "detokenize": False,
            "skip_special_tokens": False,
        }


# (version, start, end): output tokens [start, end) were sampled by weights of `version`.
Segment = tuple[int, int, int]


@dataclass
class Completion:
    """One completion, possibly joined from several segments generated under different
    weights. `versions` holds, per output token, the version the serving vLLM reported."""

    output_ids: list[int] = field(default_factory=list)
    # μ_t: logprob of each token under the weights that sampled it.
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""
    segments: list[Segment] = field(default_factory=list)
    # HTTP requests it took: one per segment, plus retries after connection errors/timeouts.
    n_requests: int = 0
    # The logprobs of output tokens [0, len(prefix_logprobs)) under the weights of
    # `prefix_version`, from the prefill of the completion's last continuation that asked for
    # them (InferenceClient score_continuations); None if none did. With `score_from`, they
    # start at prompt_ids[score_from] instead (an episode's first output token).
    prefix_logprobs: list[float] | None = None
    prefix_version: int | None = None

    @property
    def n_segments(self) -> int:
        """Runs of consecutive tokens produced under one version."""
        return len(self.segments)

    def keep_prefix_logprobs(
        self, logprobs: list[float], versions: list[int], scored_prompt: int = 0
    ) -> None:
        """Keep the prefix logprobs of a continuation whose answer brought `versions`: the
        prefill ran under the weights of its tokens, known only if it brought some. They may
        start `scored_prompt` tokens before the output (an episode's earlier turns)."""
        if (
            versions
            and len(set(versions)) == 1
            and len(logprobs) <= scored_prompt + len(self.output_ids)
        ):
            self.prefix_logprobs = list(logprobs)
            self.prefix_version = versions[0]

    def append(self, ids: list[int], logprobs: list[float], versions: list[int]) -> None:
        """Add the tokens of one server answer, merging runs of equal version into segments."""
        for token, logprob, version in zip(ids, logprobs, versions, strict=True):
            position = len(self.output_ids)
            self.output_ids.append(token)
            self.logprobs.append(logprob)
            self.versions.append(version)
            if self.segments and self.segments[-1][0] == version:
                last = self.segments[-1]
                self.segments[-1] = (last[0], last[1], position + 1)
            else:
                self.segments.append((version, position, position + 1))
