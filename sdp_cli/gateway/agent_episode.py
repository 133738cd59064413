"""One agent episode behind the gateway: OpenAI calls in, exact token ids and OpenAI answers out.

An episode holds one or more *branches* (trajectories). A call continues the branch whose
context its history extends: a chat call's messages start with the branch's messages so far
(the answers the gateway gave included), a completions call's prompt starts with the branch's
text (or its ids). Only the messages (or text) after that are rendered, on top of the branch's
exact ids (`render.Renderer.new_message_ids`), appended as context, and the model turn is
sampled after the exact ids through `TurnSession` (segments, versions, continuation after an
abort). A call that extends no branch (the agent forked or rewrote its history) starts a new
branch, its whole history rendered once as the branch's prompt.

Which branch is trained: the branch of the episode's last model call, the one its final
answer came from. The other branches are counted (`n_branches`) but not trained: their tokens
were sampled in other contexts, and a group has one trajectory per episode
(docs/design.md, Episodes, "Agents through the OpenAI gateway").

Sampling: the run's temperature, top_p, top_k and seed are always used (the behaviour
logprobs must be those of the run's policy); a request's `max_tokens` (or
`max_completion_tokens`) is honoured up to `rollout.max_new_tokens`; `stop` strings are honoured
by cutting the turn after the token that completes the first one (the tokens after it are not
kept, so not trained); `n` must be 1. `stream: true` is answered as a stream of the whole turn
(openai_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sdp_cli.episodes.episode import ContextOverflow, Episode, ModelTurn
from sdp_cli.episodes.multiturn import EpisodeLimits
from sdp_cli.episodes.render import Renderer, RenderError
from sdp_cli.episodes.turns import TurnSession
from sdp_cli.gateway.openai_messages import (
    MessageError,
    extends,
    normal_message,
    normal_messages,
    parse_tool_calls,
)
from sdp_cli.inference.types import Gate, SamplingParams
from sdp_cli.rollout.rlvr import Generator
from sdp_cli.rollout.trajectory import Trajectory
from sdp_cli.tasks.environment import ChatMessage

# Seeds of branch b are offset so that a fork does not replay the first branch's stream.
_BRANCH_SEED_STRIDE = 104_729


class GatewayError(Exception):
    """A call the gateway refuses, answered as an OpenAI error with `status`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code, param)


@dataclass
class Branch:
    """One trajectory of an episode and the history it stands for."""

    session: TurnSession
    kind: str  # "chat" or "completion"
    # chat: the messages the ids hold, the gateway's answers included; and the tools rendered.
    messages: list[ChatMessage] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    # completion: the text the ids hold (prompts and the texts answered).
    text: str = ""
    # The first messages (or prompt text) rendered as the prompt, for the samples log.
    first: list[ChatMessage] = field(default_factory=list)
    last_answer: str = ""
    # False after a call failed half-way: its ids and its history no longer agree.
    usable: bool = True


@dataclass(frozen=True)
class CallSettings:
    """What the request may set for one model call, within the run's limits."""

    max_new_tokens: int
    stop: tuple[str, ...]


def call_settings(body: Mapping[str, Any], limits: EpisodeLimits, default_max: int) -> CallSettings:
    if body.get("n", 1) not in (1, None):
        raise _bad("n must be 1: every call is one model turn of the episode", "n")
    asked = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    if not isinstance(asked, int) or asked < 1:
        raise _bad(f"max_tokens must be a positive integer, got {asked!r}", "max_tokens")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a string or a list of non-empty strings", "stop")
    return CallSettings(min(asked, limits.max_new_tokens), stop)


def cut_at_stop(
    turn: ModelTurn, stop: Sequence[str], decode: Callable[[list[int]], str]
) -> tuple[ModelTurn, str | None]:
    """The turn up to the token that completes the first stop string, and the text before
    it; the turn unchanged and None when no stop string occurs."""
    if not stop or not any(s in decode(turn.ids) for s in stop):
        return turn, None
    for k in range(1, len(turn.ids) + 1):
        text = decode(turn.ids[:k])
        at = min((text.find(s) for s in stop if s in text), default=-1)
        if at >= 0:
            segments = [(v, a, min(b, k)) for v, a, b in turn.segments if a < k]
            cut = replace(
                turn,
                ids=turn.ids[:k],
                logprobs=turn.logprobs[:k],
                versions=turn.versions[:k],
                segments=segments,
                finish_reason="stop",
                # A continuation's scores may reach past the cut; the recompute scores instead.
                prefix_logprobs=None,
                prefix_version=None,
            )
            return cut, text[:at]
    return turn, None


class AgentEpisode:
    """The gateway's state for one episode: its branches and the calls made to it."""

    def __init__(
        self,
        episode_id: str,
        renderer: Renderer,
        generator: Generator,
        sampling: SamplingParams,
        limits: EpisodeLimits,
        decode: Callable[[list[int]], str],
        encode_text: Callable[[str], list[int]],
        model_name: str,
        gate: Gate | None = None,
    ) -> None:
        self.episode_id = episode_id
        self.renderer = renderer
        self.generator = generator
        self.sampling = sampling
        self.limits = limits
        self.decode = decode
        # A completions prompt's text → ids with BOS (tasks.base.encode_prompt).
        self.encode_text = encode_text
        self.model_name = model_name
        self.gate = gate
        self.branches: list[Branch] = []
        self.current: Branch | None = None
        self.n_calls = 0
        # Why the episode could not go on, when a limit stopped it ("context", "max_turns").
        self.limit_hit = ""
        # An error of the model call itself (servers, executor): the workflow raises it.
        self.failure: BaseException | None = None
        self.closed = False
        # One call at a time: a call's branch choice depends on the calls before it.
        self._lock = asyncio.Lock()
        # The tasks serving this episode's calls, cancelled when the episode is closed.
        self._in_flight: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        """End the episode: later calls are refused, and calls still being generated are
        cancelled (their agent has returned, raised or been stopped: nobody reads them, and
        the servers have better work)."""
        self.closed = True
        for task in list(self._in_flight):
            task.cancel()

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            yield
        finally:
            self._in_flight.discard(task)  # type: ignore[arg-type]

    # ---- the calls ----------------------------------------------------------------------

    async def chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a /v1/chat/completions body."""
        with self._serving():
            return await self._chat(body)

    async def _chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            self._check_open()
            try:
                messages = normal_messages(body.get("messages"))
            except MessageError as exc:
                raise _bad(str(exc), "messages") from exc
            tools = body.get("tools") or None
            if tools is not None and not isinstance(tools, list):
                raise _bad("tools must be a list", "tools")
            settings = call_settings(body, self.limits, self.limits.max_new_tokens)
            self._check_turns()
            branch, prompt_len = self._chat_branch(messages, tools)
            turn, answer = await self._model_turn(branch, settings)
            content, calls = parse_tool_calls(answer) if tools else (answer, [])
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if calls:
                message["tool_calls"] = calls
            elif not content:
                message["content"] = ""
            branch.messages = [*messages, normal_message(message)]
            finish = "tool_calls" if calls else _finish(turn)
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model") or self.model_name),
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                ],
                "usage": _usage(prompt_len, len(turn.ids)),
            }

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a /v1/completions body."""
        with self._serving():
            return await self._completion(body)

    async def _completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            self._check_open()
            prompt = _single_prompt(body.get("prompt"))
            if body.get("echo"):
                raise _bad("echo is not supported by the sdp gateway", "echo")
            settings = call_settings(body, self.limits, 16)
            self._check_turns()
            branch, prompt_len = self._completion_branch(prompt)
            turn, answer = await self._model_turn(branch, settings)
            branch.text = (prompt if isinstance(prompt, str) else "") + answer
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": str(body.get("model") or self.model_name),
                "choices": [
                    {"index": 0, "text": answer, "finish_reason": _finish(turn), "logprobs": None}
                ],
                "usage": _usage(prompt_len, len(turn.ids)),
            }

    # ---- branches -----------------------------------------------------------------------

    def _chat_branch(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None
    ) -> tuple[Branch, int]:
        """The branch this call continues, its new messages appended as context; or a new
        branch with the whole history as its prompt. Returns it and the prompt length."""
        for branch in reversed(self.branches):
            if (
                branch.usable
                and branch.kind == "chat"
                and branch.tools == tools
                and extends(messages, branch.messages)
            ):
                new = messages[len(branch.messages) :]
                episode = branch.session.episode
                try:
                    ids = self.renderer.new_message_ids(
                        episode.context_ids(), branch.messages[-1]["role"], new, tools
                    )
                except RenderError as exc:
                    raise _bad(str(exc), "messages") from exc
                role = new[-1]["role"] if new else "user"
                text = "\n".join(m["content"] for m in new)
                self._add_context(branch, ids, role, text)
                return branch, len(episode)
        try:
            prompt_ids = self.renderer.prompt_ids(messages, tools)
        except RenderError as exc:
            raise _bad(str(exc), "messages") from exc
        branch = self._new_branch(prompt_ids, "chat")
        branch.tools, branch.first = tools, list(messages)
        return branch, len(prompt_ids)

    def _completion_branch(self, prompt: str | list[int]) -> tuple[Branch, int]:
        for branch in reversed(self.branches):
            if not (branch.usable and branch.kind == "completion"):
                continue
            episode = branch.session.episode
            if isinstance(prompt, str) and branch.text and prompt.startswith(branch.text):
                ids = self.renderer.encode(prompt[len(branch.text) :])
            elif isinstance(prompt, list) and prompt[: len(episode)] == episode.context_ids():
                ids = prompt[len(episode) :]
            else:
                continue
            self._add_context(branch, ids, "user", self.decode(ids))
            return branch, len(episode)
        ids = self.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
        branch = self._new_branch(ids, "completion")
        branch.first = [{"role": "user", "content": self.decode(ids)}]
        return branch, len(ids)

    def _new_branch(self, prompt_ids: list[int], kind: str) -> Branch:
        if not prompt_ids:
            raise _bad("the prompt renders to no tokens", "prompt")
        if len(prompt_ids) >= self.limits.max_tokens:
            self.limit_hit = "context"
            raise GatewayError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; the episode may hold "
                f"{self.limits.max_tokens} (rollout.max_episode_tokens, server.max_model_len)",
                "context_length_exceeded",
                "messages",
            )
        seed = self.sampling.seed
        offset = _BRANCH_SEED_STRIDE * len(self.branches)
        sampling = replace(self.sampling, seed=None if seed is None else seed + offset)
        episode = Episode(prompt_ids, max_tokens=self.limits.max_tokens)
        session = TurnSession(
            episode, self.generator, sampling, self.limits.max_new_tokens, self.gate
        )
        branch = Branch(session=session, kind=kind)
        self.branches.append(branch)
        return branch

    def _add_context(self, branch: Branch, ids: list[int], role: str, text: str) -> None:
        try:
            branch.session.add_context(ids, role, text)
        except ContextOverflow as exc:
            self.limit_hit = "context"
            raise GatewayError(400, str(exc), "context_length_exceeded", "messages") from exc

    async def _model_turn(self, branch: Branch, settings: CallSettings) -> tuple[ModelTurn, str]:
        """Sample one model turn on `branch` and append it; the turn and the text answered."""
        branch.usable = False  # until the turn is in and the history updated
        try:
            turn = await branch.session.generate_turn(max_new_tokens=settings.max_new_tokens)
        except ContextOverflow as exc:
            self.limit_hit = "context"
            raise GatewayError(400, str(exc), "context_length_exceeded") from exc
        except GatewayError:
            raise
        except Exception as exc:
            # The servers or the executor failed, not the agent: the workflow raises it.
            self.failure = exc
            raise GatewayError(500, f"the model call failed: {exc!r}", "model_failed") from exc
        turn, before_stop = cut_at_stop(turn, settings.stop, self.decode)
        text = self.decode(turn.ids)
        branch.session.add_model_turn(turn, text)
        branch.usable = True
        branch.last_answer = text if before_stop is None else before_stop
        self.current = branch
        self.n_calls += 1
        return turn, branch.last_answer

    # ---- limits and the result ----------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise GatewayError(404, f"episode {self.episode_id} has ended", "episode_ended")

    def _check_turns(self) -> None:
        if self.n_calls >= self.limits.max_turns:
            self.limit_hit = "max_turns"
            raise GatewayError(
                400,
                f"this episode has made its {self.limits.max_turns} model calls "
                "(rollout.max_turns)",
                "max_turns_exceeded",
            )

    @property
    def n_branches(self) -> int:
        return len(self.branches)

    @property
    def final_answer(self) -> str:
        """The text of the last model call (what a task's reward function scores)."""
        return "" if self.current is None else self.current.last_answer

    def trajectory(self, reward: float, end_reason: str) -> Trajectory | None:
        """The trained branch as a trajectory (None if no model call was made)."""
        branch = self.current
        if branch is None:
            return None
        episode = branch.session.episode
        trajectory = episode.to_trajectory(reward, end_reason)
        first = [
            {
                "role": m["role"],
                "text": m["content"],
                # One rendering of all the first messages: its tokens count on the last.
                "n_tokens": len(episode.prompt_ids) if i == len(branch.first) - 1 else 0,
                "trained": False,
            }
            for i, m in enumerate(branch.first)
        ]
        return replace(trajectory, turns=first + list(trajectory.turns or []))


def _single_prompt(prompt: Any) -> str | list[int]:
    """A completions prompt: one string or one list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        return [int(i) for i in prompt]
    raise _bad("prompt must be one non-empty string or one list of token ids", "prompt")


def _finish(turn: ModelTurn) -> str:
    return "length" if turn.finish_reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
