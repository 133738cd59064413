"""The vLLM 0.32 HTTP protocol sdp speaks: request bodies and answer parsing
(docs/design.md, Weight-update protocol).

Kept free of I/O so the parsing rules are unit-testable against recorded answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdp_cli.inference.client_errors import ServerProtocolError

# The name the launcher serves the policy under; /v1/completions requests must name it.
SERVED_MODEL_NAME = "sdp-policy"
# vLLM reports this before the first /update_weight_version call: the initial weights.
INITIAL_VERSION_NAME = "default"

GENERATE_PATH = "/inference/v1/generate"
ABORT_PATH = "/inference/v1/abort_requests"
COMPLETIONS_PATH = "/v1/completions"


def parse_version(name: str | int | None) -> int:
    """A server's weight version string as sdp's integer version."""
    if name is None or name == INITIAL_VERSION_NAME:
        return 0
    try:
        return int(name)
    except (TypeError, ValueError):
        raise ServerProtocolError(
            f"server reported weight version {name!r}; sdp versions are integers"
        ) from None


@dataclass
class GenerateAnswer:
    """The one choice of a /inference/v1/generate answer."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    # With `prompt_logprobs: 0` asked: each output token's logprob so far (the request's
    # tokens after the prompt) under the weights that made `token_ids` (parse_prefix_logprobs).
    prefix_logprobs: list[float] | None = None


def generate_body(request_id: str, token_ids: list[int], sampling: dict[str, Any]) -> dict:
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "return_token_ids": True,
        "stream": False,
        "output_mode": "tokens",
        "sampling_params": sampling,
    }


def versions_from_spans(spans: list[dict[str, Any]] | None, n_tokens: int) -> list[int]:
    """Per-token versions from `weight_versions` spans [{"version","start","end"}]; the spans
    must cover every output token, since sdp never guesses a token's version."""
    versions: list[int | None] = [None] * n_tokens
    for span in spans or []:
        version = parse_version(span["version"])
        for position in range(int(span["start"]), min(int(span["end"]), n_tokens)):
            versions[position] = version
    if any(v is None for v in versions):
        raise ServerProtocolError(
            f"weight_versions spans {spans} do not cover all {n_tokens} output tokens"
        )
    return [v for v in versions if v is not None]


def parse_generate_answer(payload: dict[str, Any]) -> GenerateAnswer:
    try:
        choice = payload["choices"][0]
        token_ids = list(choice.get("token_ids") or [])
        content = (choice.get("logprobs") or {}).get("content") or []
        logprobs = [float(entry["logprob"]) for entry in content]
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerProtocolError(f"unexpected generate answer: {exc!r}") from None
    if len(logprobs) != len(token_ids):
        raise ServerProtocolError(
            f"generate answer has {len(token_ids)} tokens but {len(logprobs)} logprobs"
        )
    return GenerateAnswer(
        token_ids=token_ids,
        logprobs=logprobs,
        versions=versions_from_spans(choice.get("weight_versions"), len(token_ids)),
        finish_reason=str(choice.get("finish_reason") or "stop"),
    )


def parse_prefix_logprobs(
    payload: dict[str, Any], token_ids: list[int], start: int, aborted: bool = False
) -> list[float] | None:
    """From a /inference/v1/generate answer to a request for `token_ids` with
    `prompt_logprobs: 0`: the logprob of token_ids[i] given token_ids[:i] for every i >= start,
    under the weights that answered; None if the server sent no prompt logprobs, or sent only
    part of them for a request it `aborted` before its prefill ran. (vLLM computes prompt
    logprobs from the raw logits, whatever the request's sampling settings.)"""
    entries = payload.get("prompt_logprobs")
    if not entries or (aborted and len(entries) < len(token_ids)):
        return None
    if len(entries) != len(token_ids):
        raise ServerProtocolError(
            f"generate answer has {len(entries)} prompt logprobs for {len(token_ids)} tokens"
        )
    try:
        return _sequence_logprobs(entries, token_ids, start, 1.0)
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerProtocolError(
            f"unexpected prompt logprobs in a generate answer: {exc!r}"
        ) from None


def prompt_logprobs_body(
    sequences: list[list[int]], model: str, whole_distribution: bool = False
) -> dict[str, Any]:
    """One request for many sequences: vLLM runs a list of prompts through the engine together,
    so a batch costs one HTTP round trip instead of one per sequence. `whole_distribution` asks
    for every token's logprob at each position (to temper them here: vLLM's prompt logprobs
    are always at temperature 1)."""
    return {
        "model": model,
        "prompt": sequences,
        "max_tokens": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "seed": 0,
        "prompt_logprobs": -1 if whole_distribution else 0,
        "logprobs": None,
        "echo": False,
        "stream": False,
    }


def parse_prompt_logprobs(
    payload: dict[str, Any],
    sequences: list[list[int]],
    starts: list[int],
    temperature: float = 1.0,
) -> list[list[float]]:
    """For each sequence, the logprob of ids[i] given ids[:i] for i >= its start, at
    `temperature` (other than 1 needs the answer of a `whole_distribution` request). Choice k
    answers prompt k (matched by its `index`); entry i of its `prompt_logprobs` is keyed by the
    token id as a string (entry 0 is null)."""
    try:
        choices = sorted(payload["choices"], key=lambda choice: int(choice.get("index", 0)))
        if len(choices) != len(sequences):
            raise ServerProtocolError(
                f"prompt_logprobs answer has {len(choices)} choices for {len(sequences)} prompts"
            )
        return [
            _sequence_logprobs(choice["prompt_logprobs"], ids, start, temperature)
            for choice, ids, start in zip(choices, sequences, starts, strict=True)
        ]
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerProtocolError(f"unexpected prompt_logprobs answer: {exc!r}") from None


def _sequence_logprobs(
    entries: list[Any], ids: list[int], start: int, temperature: float
) -> list[float]:
    if temperature == 1.0:
        return [float(entries[i][str(ids[i])]["logprob"]) for i in range(start, len(ids))]
    return [tempered_logprob(entries[i], ids[i], temperature) for i in range(start, len(ids))]


def tempered_logprob(entry: dict[str, Any], token_id: int, temperature: float) -> float:
    """log softmax(z/T) of `token_id` from the temperature-1 logprobs of the whole vocabulary:
    log p = z − c, so (log p)/T differs from z/T by a constant that the softmax cancels."""
    if len(entry) < 2:
        raise ServerProtocolError(
            "prompt logprobs at a temperature other than 1 need the whole distribution; "
            "the server answered one token per position (start it with --max-logprobs -1)"
        )
    scaled = [float(value["logprob"]) / temperature for value in entry.values()]
    top = max(scaled)
    normalizer = top + math.log(sum(math.exp(x - top) for x in scaled))
    return float(entry[str(token_id)]["logprob"]) / temperature - normalizer
