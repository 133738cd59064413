"""Agent workflow: `rollout.n_samples` episodes of one task instance, each played by an agent
program through the OpenAI-compatible gateway (`task.agent=module:function`).

Per episode, sdp opens a base URL on the gateway and calls

    reward = await function(base_url, model_name, instance)

(a plain function runs in a worker thread), where `instance` is the task's prompt at the data
position: its meta (reference answer...) plus `question`. The agent talks to the model with any
OpenAI client (`AsyncOpenAI(base_url=base_url, api_key="sdp")`); every call is a model turn of
the episode (sdp_cli/gateway/agent_episode.py). It returns a reward in [0, 1], or None: then the
task's reward function scores the text of the episode's last model call.

Failures never crash the run. An agent that raises, times out (`task.agent_timeout_s`), makes
no model call or returns a reward out of range rejects the rollout (`EpisodeRejected`, reason
`environment`, each kind logged once). An agent stopped by a limit (the episode's tokens, or
`rollout.max_turns` calls: the gateway answers HTTP 400) ends its episode with reason `context`
or `max_turns` and reward 0 if it raised, and is trained. A failure of the model call itself
(the servers, the executor stopping) is raised as it would be by any workflow.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.episodes.multiturn import EpisodeLimits
from sdp_cli.episodes.render import PLAIN_CHAT_TEMPLATE, Renderer
from sdp_cli.errors import ConfigError, EpisodeRejected
from sdp_cli.gateway.agent_episode import AgentEpisode
from sdp_cli.gateway.openai_server import Gateway
from sdp_cli.inference.protocol import SERVED_MODEL_NAME
from sdp_cli.inference.types import Gate, SamplingParams
from sdp_cli.rollout.positions import DataPositions
from sdp_cli.rollout.rlvr import Generator, sample_seed, stop_token_ids
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.base import Prompt, Task, decode_completion, encode_prompt
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.environment import EnvTask, instance_of

T = TypeVar("T")
Agent = Callable[[str, str, dict[str, Any]], Awaitable[float | None] | float | None]


def load_agent(dotted: str) -> Agent:
    """`module:function` of an agent (ConfigError naming task.agent when it is not one)."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            "task.agent",
            f"'{dotted}' is not a dotted path to a function",
            "write it as module:function",
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: any failure is the user's module
        raise ConfigError(
            "task.agent",
            f"cannot import module '{module_name}' for '{dotted}': {exc!r}",
            "check the spelling and that the module is importable (on PYTHONPATH)",
        ) from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(
            "task.agent",
            f"'{dotted}' is not a function",
            "point it at a function (base_url, model_name, instance) -> reward or None",
        )
    return function


def check_agent(cfg: TaskConfig) -> list[str]:
    """`task.agent` imports and is not combined with an environment; what was checked."""
    if not cfg.agent:
        return []
    if cfg.env:
        raise ConfigError(
            "task.agent",
            "an agent plays the episodes, and so does task.env",
            "set one of task.agent and task.env to null",
        )
    load_agent(cfg.agent)
    return [f"task.agent {cfg.agent} imports"]


def agent_reward(value: Any) -> float | None:
    """An agent's return value as a reward (None: let the task score the answer)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EpisodeRejected(
            "agent reward type", f"the agent returned {value!r:.60}, not a number or None"
        )
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise EpisodeRejected("agent reward range", f"the agent's reward {value} is not in [0, 1]")
    return float(value)


async def all_or_none(plays: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every play's result in order; when one raises, the others are cancelled (their agents
    would go on calling the model for a rollout that is rejected) and its error is raised."""
    tasks = [asyncio.ensure_future(play) for play in plays]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]


class AgentWorkflow:
    def __init__(
        self,
        task: Task,
        agent: Agent,
        generator: Generator,
        renderer: Renderer,
        decode: Callable[[list[int]], str],
        encode_text: Callable[[str], list[int]],
        rollout: RolloutConfig,
        limits: EpisodeLimits,
        agent_timeout_s: float,
        eos_token_id: int | None,
        run_seed: int = 0,
        positions: DataPositions | None = None,
        model_name: str = SERVED_MODEL_NAME,
    ) -> None:
        self.task = task
        self.agent = agent
        self.generator = generator
        self.renderer = renderer
        self.decode = decode
        self.encode_text = encode_text
        self.rollout = rollout
        self.limits = limits
        self.agent_timeout_s = agent_timeout_s
        self.stop_token_ids = stop_token_ids(eos_token_id, task.stop_token_ids)
        self.run_seed = run_seed
        self.positions = positions
        self.model_name = model_name
        self.gateway = Gateway(model_name)
        self._ids = itertools.count()
        self._starting: asyncio.Task[None] | None = None
        # Episodes whose agent forked its history (more than one branch), and branches left
        # untrained by them.
        self.n_forked = 0
        self.n_untrained_branches = 0

    @classmethod
    def from_config(
        cls,
        cfg: SdpConfig,
        task: Task,
        tokenizer: PreTrainedTokenizerBase,
        generator: Generator,
        positions: DataPositions | None = None,
    ) -> AgentWorkflow:
        """The workflow of `task.agent` on `task.name`'s prompts and reward. Messages are
        rendered with the model's chat template (render.PLAIN_CHAT_TEMPLATE without one, or
        with task.chat_template=false); the agent writes its own system prompt."""
        if cfg.task.agent is None:
            raise ConfigError("task.agent", "no agent is set", "set task.agent=module:function")
        if isinstance(task, EnvTask):
            raise ConfigError(
                "task.agent",
                f"task {task.name} plays its own environment",
                "set task.name to a single-turn task whose prompts the agent answers",
            )
        use_template = PromptFormat.from_config(cfg.task, tokenizer).use_chat_template
        stops = task.stop_token_ids
        return cls(
            task,
            load_agent(cfg.task.agent),
            generator,
            Renderer(tokenizer, None if use_template else PLAIN_CHAT_TEMPLATE),
            lambda ids: decode_completion(tokenizer, ids, stops),
            lambda text: encode_prompt(tokenizer, text),
            cfg.rollout,
            EpisodeLimits.from_config(
                cfg.rollout, cfg.server.max_model_len, cfg.task.env_timeout_s
            ),
            cfg.task.agent_timeout_s,
            eos_token_id=tokenizer.eos_token_id,
            run_seed=cfg.run.seed,
            positions=positions,
        )

    def sampling(self, rollout_id: int, sample_index: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            top_k=self.rollout.top_k,
            seed=sample_seed(self.run_seed, rollout_id, sample_index),
            stop_token_ids=self.stop_token_ids,
        )

    async def start(self) -> None:
        """Start the gateway on the running loop (once, however many callers ask)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self.gateway.start())
        await asyncio.shield(self._starting)

    async def aclose(self) -> None:
        await self.gateway.aclose()

    async def run(self, rollout_id: int, executor_version: int, gate: Gate) -> RolloutGroup | None:
        position = rollout_id if self.positions is None else self.positions.position(rollout_id)
        prompt = self.task.sample_prompt(position)
        episodes = await all_or_none(
            [
                self.play(prompt, self.sampling(rollout_id, index), gate)
                for index in range(self.rollout.n_samples)
            ]
        )
        return RolloutGroup(
            rollout_id=rollout_id,
            samples=list(episodes),
            submit_version=executor_version,
            meta={**prompt.meta, "prompt": prompt.text, "position": position},
        )

    async def play(self, prompt: Prompt, sampling: SamplingParams, gate: Gate | None) -> Trajectory:
        """One episode of the agent on `prompt`'s instance."""
        await self.start()
        episode = AgentEpisode(
            f"e{next(self._ids)}",
            self.renderer,
            self.generator,
            sampling,
            self.limits,
            self.decode,
            self.encode_text,
            self.model_name,
            gate,
        )
        base_url = self.gateway.open(episode)
        started = time.monotonic()
        try:
            returned = await self._call_agent(base_url, instance_of(prompt), episode)
        finally:
            self.gateway.close(episode.episode_id)
        if episode.failure is not None:
            raise episode.failure
        reward, end = returned
        if reward is None:
            reward = float(self.task.reward(episode.final_answer, prompt.meta))
        trajectory = episode.trajectory(reward, end)
        if trajectory is None:
            raise EpisodeRejected("agent made no call", "the agent made no model call")
        # The agent's own time (its code, its tools): the episode's wall time outside the
        # model calls of every branch.
        generate_s = sum(b.session.episode.generate_s for b in episode.branches)
        trajectory = replace(trajectory, env_s=max(0.0, time.monotonic() - started - generate_s))
        if episode.n_branches > 1:
            self.n_forked += 1
            self.n_untrained_branches += episode.n_branches - 1
        return trajectory

    async def _call_agent(
        self, base_url: str, instance: Mapping[str, Any], episode: AgentEpisode
    ) -> tuple[float | None, str]:
        """Run the agent; its reward (None: the task scores) and the episode's end reason."""
        agent, timeout = self.agent, self.agent_timeout_s
        try:
            if inspect.iscoroutinefunction(agent):
                value = await asyncio.wait_for(
                    agent(base_url, self.model_name, dict(instance)), timeout
                )
            else:
                value = await asyncio.wait_for(
                    asyncio.to_thread(agent, base_url, self.model_name, dict(instance)), timeout
                )
        except TimeoutError:
            if episode.failure is not None:
                raise episode.failure from None
            raise EpisodeRejected(
                "agent timeout", f"the agent took more than task.agent_timeout_s={timeout:g}s"
            ) from None
        except EpisodeRejected:
            raise
        except Exception as exc:
            if episode.failure is not None:
                raise episode.failure from exc
            if episode.limit_hit and episode.current is not None:
                # Stopped by the episode's limits: trained as far as it got.
                return 0.0, episode.limit_hit
            raise EpisodeRejected(
                f"agent {type(exc).__name__}", f"the agent raised: {exc!r}"
            ) from exc
        return agent_reward(value), episode.limit_hit or "done"
