"""`task.agent`: episodes played by agent programs written with the real `openai` client (the
shipped example among them) through the gateway, their model calls going through the real
InferenceClient to fake vLLM servers: groups, rewards, and every way an agent can fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.episodes.render import Renderer
from sdp_cli.errors import ConfigError, EpisodeRejected
from sdp_cli.gateway import example_agent
from sdp_cli.gateway.agent_workflow import Agent, AgentWorkflow, load_agent
from sdp_cli.inference import ServerPool
from sdp_cli.inference.client_errors import RequestRejectedError
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.tasks.base import Prompt, decode_completion, encode_prompt
from tests.unit.gateway.smollm2_tokenizer import smollm2_tokenizer
from tests.unit.gateway.test_gateway import ScriptedModel, limits
from tests.unit.inference.test_client import A, FakeServers, make_client


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer(tmp_path_factory)


class SumTask:
    """One question, "What is 2 plus 3?"; a completion is right when it contains 5."""

    name = "sum"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.stop_token_ids = (int(tokenizer.convert_tokens_to_ids("<|im_end|>")),)
        self.tokenizer = tokenizer

    def sample_prompt(self, position: int) -> Prompt:
        question = "What is 2 plus 3?"
        ids = encode_prompt(self.tokenizer, question)
        return Prompt(question, ids, {"target": "5"}, question=question)

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self.sample_prompt(0)] * n

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        return 1.0 if str(meta["target"]) in completion_text else 0.0


def workflow(
    tokenizer: PreTrainedTokenizerBase, handler: Any, agent: Agent, **limit: Any
) -> AgentWorkflow:
    task = SumTask(tokenizer)
    client = make_client(ServerPool([A]), FakeServers(handler), max_model_len=4096)
    return AgentWorkflow(
        task,
        agent,
        client,
        Renderer(tokenizer),
        lambda ids: decode_completion(tokenizer, ids, task.stop_token_ids),
        lambda text: encode_prompt(tokenizer, text),
        replace(RolloutConfig(), n_samples=2, max_new_tokens=32),
        limits(**limit),
        agent_timeout_s=30.0,
        eos_token_id=tokenizer.eos_token_id,
        model_name="sdp-test",
    )


def run_group(flow: AgentWorkflow) -> RolloutGroup | None:
    async def run() -> RolloutGroup | None:
        async def gate() -> None:
            return None

        try:
            return await flow.run(0, 0, gate)
        finally:
            assert flow.gateway.n_open == 0  # every episode's URL is closed after it
            await flow.aclose()

    return asyncio.run(run())


def test_the_example_agent_makes_two_calls_per_episode_and_the_task_scores_its_answer(
    smol: PreTrainedTokenizerBase,
) -> None:
    # Each episode first answers 4 (wrong), then, asked to check, 5: the final answer counts.
    bodies: list[dict[str, Any]] = []

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        bodies.append(body)
        checking = example_agent.CHECK_PROMPT in smol.decode(body["token_ids"])
        model = ScriptedModel(smol, ["5" if checking else "4"])
        return model(address, path, body)

    flow = workflow(smol, handler, example_agent.answer_then_check)
    group = run_group(flow)
    assert group is not None and len(group.samples) == 2
    assert group.rewards == [1.0, 1.0]
    for sample in group.samples:
        turns = sample.turns or []
        assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[2]["text"] == example_agent.CHECK_PROMPT
        assert sample.end_reason == "done"
    assert len(bodies) == 4 and flow.n_forked == 0


def test_a_plain_function_agent_runs_in_a_thread_with_the_sync_client(
    smol: PreTrainedTokenizerBase,
) -> None:
    def agent(base_url: str, model_name: str, instance: dict[str, Any]) -> float:
        with openai.OpenAI(base_url=base_url, api_key="sdp", max_retries=0) as client:
            reply = client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": instance["question"]}]
            )
        time.sleep(0.3)  # the agent's own work (a tool): environment time, not generation
        return 0.25 if reply.choices[0].message.content == "5" else 0.0

    flow = workflow(smol, ScriptedModel(smol, ["5", "5"]), agent)
    group = run_group(flow)
    assert group is not None and group.rewards == [0.25, 0.25]
    for sample in group.samples:
        assert sample.env_s is not None and 0.3 <= sample.env_s < 5.0


async def raises(base_url: str, model_name: str, instance: dict[str, Any]) -> None:
    raise ValueError("the agent's own bug")


async def too_much(base_url: str, model_name: str, instance: dict[str, Any]) -> float:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sdp", max_retries=0) as client:
        await client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi"}]
        )
    return 2.0


async def silent(base_url: str, model_name: str, instance: dict[str, Any]) -> float:
    return 1.0


async def slow(base_url: str, model_name: str, instance: dict[str, Any]) -> None:
    await asyncio.sleep(30)


@pytest.mark.parametrize(
    ("agent", "kind"),
    [
        (raises, "agent ValueError"),
        (too_much, "agent reward range"),
        (silent, "agent made no call"),
        (slow, "agent timeout"),
    ],
)
def test_a_failing_agent_rejects_the_rollout_with_its_kind(
    smol: PreTrainedTokenizerBase, agent: Agent, kind: str
) -> None:
    flow = workflow(smol, ScriptedModel(smol, ["5", "5"]), agent)
    # Short for the agent that sleeps; long enough for a call on a busy machine otherwise.
    flow.agent_timeout_s = 0.5 if agent is slow else 60.0
    with pytest.raises(EpisodeRejected) as caught:
        run_group(flow)
    assert caught.value.kind == kind


async def loops(base_url: str, model_name: str, instance: dict[str, Any]) -> float:
    """Asks again and again, never stopping on its own: the gateway's max_turns stops it."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sdp", max_retries=0) as client:
        messages: list[Any] = [{"role": "user", "content": instance["question"]}]
        while True:
            reply = await client.chat.completions.create(model=model_name, messages=messages)
            messages += [reply.choices[0].message, {"role": "user", "content": "Again."}]


def test_an_agent_stopped_by_max_turns_is_trained_as_far_as_it_got(
    smol: PreTrainedTokenizerBase,
) -> None:
    flow = workflow(smol, ScriptedModel(smol, ["5"] * 6), loops, max_turns=3)
    group = run_group(flow)
    assert group is not None
    for sample in group.samples:
        assert sample.end_reason == "max_turns" and sample.reward == 0.0
        assert [t["trained"] for t in sample.turns or []].count(True) == 3


def test_a_call_still_generating_when_its_agent_is_stopped_is_cancelled(
    smol: PreTrainedTokenizerBase,
) -> None:
    generating: list[str] = []

    async def slow_server(address: str, path: str, body: dict[str, Any]) -> Any:
        generating.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            generating.append("cancelled")
            raise
        return ScriptedModel(smol, ["5"])(address, path, body)

    flow = workflow(smol, slow_server, example_agent.answer_then_check)
    flow.agent_timeout_s = 1.0

    async def run() -> list[str]:
        with pytest.raises(EpisodeRejected) as caught:
            await flow.run(0, 0, _open_gate)
        assert caught.value.kind == "agent timeout"
        await asyncio.sleep(0.2)  # the cancellation reaches the request
        seen = list(generating)
        await flow.aclose()
        return seen

    seen = asyncio.run(run())
    assert seen.count("started") == 2 and seen.count("cancelled") == 2


async def _open_gate() -> None:
    return None


def test_a_failed_model_call_is_raised_as_the_servers_error_not_the_agents(
    smol: PreTrainedTokenizerBase,
) -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        return httpx.Response(400, json={"error": "bad request"})

    flow = workflow(smol, handler, example_agent.answer_then_check)
    with pytest.raises(RequestRejectedError):
        run_group(flow)


def test_an_agent_that_forks_is_counted(smol: PreTrainedTokenizerBase) -> None:
    async def forks(base_url: str, model_name: str, instance: dict[str, Any]) -> None:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="sdp", max_retries=0) as client:
            for question in ("one?", "two?"):
                await client.chat.completions.create(
                    model=model_name, messages=[{"role": "user", "content": question}]
                )

    flow = workflow(smol, ScriptedModel(smol, ["1", "5", "1", "5"]), forks)
    group = run_group(flow)
    assert group is not None
    assert flow.n_forked == 2 and flow.n_untrained_branches == 2
    # The trained branch is the last call's: its prompt is the second question.
    for sample in group.samples:
        assert "two?" in smol.decode(sample.prompt_ids)


def test_task_agent_must_name_an_importable_function() -> None:
    assert load_agent("sdp_cli.gateway.example_agent:answer_then_check") is (
        example_agent.answer_then_check
    )
    for dotted, says in [
        ("nodots", "module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("sdp_cli.gateway.example_agent:CHECK_PROMPT", "is not a function"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_agent(dotted)
        assert caught.value.key == "task.agent" and says in str(caught.value)


def test_preflight_checks_task_agent_before_a_run() -> None:
    from typer.testing import CliRunner

    from sdp_cli.cli import app
    from tests import REPO

    example = f"conf={REPO / 'conf/examples/tiny-openai-agent.yaml'}"
    runner = CliRunner()
    ok = runner.invoke(app, ["train", example, "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "task.agent sdp_cli.gateway.example_agent:answer_then_check imports" in ok.output
    for override, says in [
        ("task.agent=no_such_module_x:f", "cannot import module 'no_such_module_x'"),
        ("task.env=sdp_cli.tasks.feedback:FeedbackEnv", "set one of task.agent and task.env"),
    ]:
        bad = runner.invoke(app, ["train", example, "--dry-run", override])
        assert bad.exit_code == 2, bad.output
        assert "task.agent" in bad.output and says in bad.output
        assert "Traceback" not in bad.output
