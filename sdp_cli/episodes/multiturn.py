"""Multi-turn workflow: `n_samples` episodes of one task instance, each a conversation between
the model and the task's environment (sdp_cli/tasks/environment.py), trained as a group.

Per episode: `reset(instance)` gives the first messages, rendered whole into the prompt; then
up to `rollout.max_turns` times, a model turn is sampled after the exact ids so far (segment-
wise, through `TurnSession`), the environment's `step` answers it, and the ids its messages add
are appended as context. An episode ends when the environment says done (`done`), after the
last model turn (`max_turns`), or when the next turn or message would not fit in
`rollout.max_episode_tokens` (default `server.max_model_len`): reason `context`. Its reward is
the last step's.

Environment code never blocks the loop: a synchronous `reset`/`step` runs in a worker thread,
each call bounded by `task.env_timeout_s`, and its seconds are measured apart from generation.
An environment that raises, times out or answers out of protocol rejects the rollout
(`EpisodeRejected`, reason `environment`): the run goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.episodes.episode import ContextOverflow, Episode
from sdp_cli.episodes.messages import MessageFormat
from sdp_cli.episodes.turns import TurnSession
from sdp_cli.errors import EpisodeRejected
from sdp_cli.inference.types import Gate, SamplingParams
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.rlvr import Generator, sample_seed, stop_token_ids
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.base import Prompt
from sdp_cli.tasks.environment import ChatMessage, Environment, EnvStep, EnvTask, instance_of

END_REASONS = ("done", "max_turns", "context")


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    # Longest episode (prompt + turns), in tokens.
    max_tokens: int
    # Longest model turn, in tokens.
    max_new_tokens: int
    env_timeout_s: float

    @classmethod
    def from_config(
        cls, rollout: RolloutConfig, max_model_len: int, env_timeout_s: float
    ) -> EpisodeLimits:
        tokens = rollout.max_episode_tokens or max_model_len
        # One position short of the context, as the client keeps for scoring (client.generate).
        return cls(
            rollout.max_turns, min(tokens, max_model_len - 1), rollout.max_new_tokens, env_timeout_s
        )


# Most environment threads one workflow runs at once: every episode in flight may be waiting
# on a tool; asyncio's default executor (min(32, cores + 4) threads: 6 on 2 cores) would queue
# them, which turned a 2 s tool into tens of seconds per step at η = 2 (docs/benchmarks.md).
MAX_ENV_THREADS = 256


def env_threads(rollout: RolloutConfig) -> ThreadPoolExecutor:
    """A pool with a thread for every episode that can be in flight (up to MAX_ENV_THREADS)."""
    workers = min(MAX_ENV_THREADS, rollout.max_concurrent * rollout.n_samples)
    return ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdp-env")


async def env_call(
    method: Callable[..., Any],
    argument: Any,
    timeout_s: float,
    what: str,
    threads: Executor | None = None,
) -> tuple[Any, float]:
    """Call an environment method off the loop (a coroutine function is awaited, a plain one
    runs in a worker thread of `threads`), within `timeout_s`; returns its answer and the
    seconds it took. A thread past its timeout cannot be stopped: it is left to finish."""
    started = time.monotonic()
    try:
        if inspect.iscoroutinefunction(method):
            answer = await asyncio.wait_for(method(argument), timeout_s)
        else:
            call = asyncio.get_running_loop().run_in_executor(threads, method, argument)
            answer = await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        raise EpisodeRejected(
            f"{what} timeout", f"{what} took more than task.env_timeout_s={timeout_s:g}s"
        ) from None
    except EpisodeRejected:
        raise
    except Exception as exc:
        raise EpisodeRejected(f"{what} {type(exc).__name__}", f"{what} raised: {exc!r}") from exc
    return answer, time.monotonic() - started


def _messages(answer: Any, what: str) -> list[ChatMessage]:
    if not isinstance(answer, list) or not all(isinstance(m, dict) for m in answer):
        raise EpisodeRejected(
            f"{what} protocol", f"{what} must return a list of messages, got {answer!r:.80}"
        )
    return answer


class MultiTurnWorkflow:
    def __init__(
        self,
        task: EnvTask,
        generator: Generator,
        messages: MessageFormat,
        decode: Callable[[list[int]], str],
        rollout: RolloutConfig,
        limits: EpisodeLimits,
        eos_token_id: int | None,
        run_seed: int = 0,
        positions: DataPositions | None = None,
    ) -> None:
        self.task = task
        self.generator = generator
        self.messages = messages
        self.decode = decode
        self.rollout = rollout
        self.limits = limits
        self.stop_token_ids = stop_token_ids(eos_token_id, task.stop_token_ids)
        self.run_seed = run_seed
        self.positions = positions
        self.threads = env_threads(rollout)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn)

    def sampling(self, rollout_id: int, sample_index: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            top_k=self.rollout.top_k,
            seed=sample_seed(self.run_seed, rollout_id, sample_index),
            stop_token_ids=self.stop_token_ids,
        )

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup | None:
        position = rollout_id if self.positions is None else self.positions.position(rollout_id)
        prompt = self.task.sample_prompt(position)
        episodes = await asyncio.gather(
            *(
                self.play(prompt, self.sampling(rollout_id, index), gate)
                for index in range(self.rollout.n_samples)
            )
        )
        return RolloutGroup(
            rollout_id=rollout_id,
            samples=list(episodes),
            submit_version=executor_version,
            meta={**prompt.meta, "prompt": prompt.text, "position": position},
        )

    async def play(self, prompt: Prompt, sampling: SamplingParams, gate: Gate | None) -> Trajectory:
        """One episode on `prompt`'s instance."""
        # Making an environment runs its code (a library's constructor): off the loop too.
        env: Environment = await self._in_thread(self.task.make_env)
        try:
            return await self._play(env, prompt, sampling, gate)
        finally:
            close = getattr(env, "close", None)
            if callable(close) and not inspect.iscoroutinefunction(close):
                await self._in_thread(close)

    async def _play(
        self, env: Environment, prompt: Prompt, sampling: SamplingParams, gate: Gate | None
    ) -> Trajectory:
        limits = self.limits
        answer, env_s = await env_call(
            env.reset, instance_of(prompt), limits.env_timeout_s, "reset", self.threads
        )
        first = _messages(answer, "reset")
        _, prompt_ids = self.messages.first(first)
        episode = Episode(prompt_ids, max_tokens=limits.max_tokens)
        episode.env_s = env_s
        if len(prompt_ids) >= limits.max_tokens:
            return replace(
                episode.to_trajectory(0.0, "context"), turns=_with_first(first, prompt_ids, [])
            )
        session = TurnSession(episode, self.generator, sampling, limits.max_new_tokens, gate)
        reward, end = 0.0, "max_turns"
        for turn_index in range(limits.max_turns):
            try:
                turn = await session.generate_turn()
            except ContextOverflow:
                end = "context"
                break
            text = self.decode(turn.ids)
            session.add_model_turn(turn, text)
            answer, seconds = await env_call(
                env.step, text, limits.env_timeout_s, "step", self.threads
            )
            episode.env_s += seconds
            try:
                step = EnvStep.of(answer)
            except TypeError as exc:
                raise EpisodeRejected("step protocol", str(exc)) from None
            reward = _checked_reward(step.reward)
            if step.done:
                end = "done"
                break
            if turn_index == limits.max_turns - 1:
                break
            try:
                self._add_messages(session, _messages(step.messages, "step"))
            except ContextOverflow:
                end = "context"
                break
        trajectory = episode.to_trajectory(reward, end)
        return replace(trajectory, turns=_with_first(first, prompt_ids, trajectory.turns or []))

    def _add_messages(self, session: TurnSession, messages: list[ChatMessage]) -> None:
        """The ids the environment's messages add, appended as one context turn (the role of
        the last message: `tool` for a tool result, `user` for feedback)."""
        if not messages:
            return
        try:
            ids = self.messages.after_model(session.episode.context_ids(), messages)
        except ValueError as exc:  # render.RenderError: the template cannot add them
            raise EpisodeRejected("render", str(exc)) from exc
        role = str(messages[-1].get("role", "user"))
        text = "\n".join(str(m.get("content", "")) for m in messages)
        session.add_context(ids, role if role in ("system", "user", "tool") else "user", text)


def _checked_reward(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise EpisodeRejected("reward range", f"the environment's reward {value} is not in [0, 1]")
    return value


def _with_first(
    first: list[ChatMessage], prompt_ids: list[int], turns: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The episode's turns with its first messages before them (the prompt, not trained)."""
    heads = [
        {
            "role": str(m.get("role", "user")),
            "text": str(m.get("content", "")),
            # One rendering of all the first messages: its tokens are counted on the last.
            "n_tokens": len(prompt_ids) if i == len(first) - 1 else 0,
            "trained": False,
        }
        for i, m in enumerate(first)
    ]
    return heads + turns
