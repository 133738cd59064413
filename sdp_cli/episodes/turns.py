"""`TurnSession`: one episode's model calls and appends, for whoever drives the episode.

How a driver plugs in (the built-in multi-turn workflow, sdp_cli/episodes/multiturn.py, and the
OpenAI-compatible gateway alike):

    session = TurnSession(episode, generator, sampling, max_new_tokens, gate)
    session.add_context(ids, role, text)            # the ids new messages add (untrained)
    turn = await session.generate_turn(session.episode.context_ids())
    session.add_model_turn(turn, text)              # the sampled ids, exactly (trained)
    ...
    trajectory = session.episode.to_trajectory(reward, end_reason)

`generate_turn` goes through the same `Generator` (the inference client) as the single-turn
workflow (sdp_cli/rollout/rlvr.py): the executor's gate is awaited before every segment, and a
weight update that aborts the request mid-turn continues it as a new segment under the new
weights, so each token carries the version that sampled it. The ids sent are exactly the
episode's ids: a driver renders only what new messages add (sdp_cli/episodes/render.py), never
the conversation again. The caller gives `sampling` per call (the gateway maps the request's
OpenAI fields onto the run's); the seed of turn k is the episode's seed + k, so turns do not
replay one random stream.
"""

from __future__ import annotations

import time
from dataclasses import replace

from sdp_cli.episodes.episode import ContextOverflow, Episode, ModelTurn
from sdp_cli.inference.types import Gate, SamplingParams
from sdp_cli.rollout.rlvr import Generator


class TurnSession:
    def __init__(
        self,
        episode: Episode,
        generator: Generator,
        sampling: SamplingParams,
        max_new_tokens: int,
        gate: Gate | None = None,
    ) -> None:
        self.episode = episode
        self.generator = generator
        self.sampling = sampling
        # Per model turn (rollout.max_new_tokens); the episode's own limit may cut it shorter.
        self.max_new_tokens = max_new_tokens
        self.gate = gate
        self.n_calls = 0

    def turn_budget(self, context_len: int, max_new_tokens: int | None = None) -> int:
        """Tokens the next model turn may add after `context_len` tokens: the per-turn limit,
        cut to what is left of the episode's limit."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        limit = self.episode.max_tokens
        if limit is not None:
            budget = min(budget, limit - context_len)
        return budget

    async def generate_turn(
        self,
        context_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> ModelTurn:
        """Sample one model turn after `context_ids` (the episode's ids so far by default).
        Raises ContextOverflow when the episode has no room for a single token."""
        ids = self.episode.context_ids() if context_ids is None else list(context_ids)
        budget = self.turn_budget(len(ids), max_new_tokens)
        if budget <= 0:
            raise ContextOverflow(f"no room for a model turn after {len(ids)} tokens")
        params = sampling or self.sampling
        if params.seed is not None:
            params = replace(params, seed=params.seed + 7919 * self.n_calls)
        self.n_calls += 1
        started = time.monotonic()
        # A continuation scores the episode's output from its first token, so that the
        # recompute can take the scores for earlier turns too.
        completion = await self.generator.generate(
            ids, params, budget, gate=self.gate, score_from=len(self.episode.prompt_ids)
        )
        return ModelTurn(
            ids=list(completion.output_ids),
            logprobs=list(completion.logprobs),
            versions=list(completion.versions),
            finish_reason=completion.finish_reason,
            segments=list(completion.segments),
            n_requests=completion.n_requests,
            generate_s=time.monotonic() - started,
            prefix_logprobs=completion.prefix_logprobs,
            prefix_version=completion.prefix_version,
        )

    def add_context(self, ids: list[int], role: str, text: str = "") -> None:
        """Append environment ids (untrained); ContextOverflow when they do not fit."""
        self.episode.add_context(ids, role, text)

    def add_model_turn(self, turn: ModelTurn, text: str = "") -> None:
        """Append a model turn's sampled ids exactly (trained)."""
        self.episode.add_model_turn(turn, text)
