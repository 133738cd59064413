"""The OpenAI-compatible gateway driven by the real `openai` client over loopback HTTP, its model
calls going through the real InferenceClient to fake vLLM servers (scripted answers, an abort
mid-turn): protocol shape, usage, tool calls, exact ids across calls, forks, limits and errors.
Real vLLM: tests/integration/test_gateway_vllm.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import pytest
from openai import AsyncOpenAI
from transformers import PreTrainedTokenizerBase

from sdp_cli.episodes.multiturn import EpisodeLimits
from sdp_cli.episodes.render import Renderer
from sdp_cli.gateway.agent_episode import AgentEpisode
from sdp_cli.gateway.openai_server import Gateway
from sdp_cli.inference import ServerPool
from sdp_cli.inference.types import SamplingParams
from sdp_cli.tasks.base import decode_completion, encode_prompt
from tests.unit.gateway.smollm2_tokenizer import smollm2_tokenizer
from tests.unit.inference.test_client import A, FakeServers, answer, make_client

T = TypeVar("T")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer(tmp_path_factory)


class ScriptedModel:
    """A fake vLLM: answers the n-th generate request with the n-th scripted text's ids and
    the end-of-turn token (cut to the request's max_tokens), under `version`; records bodies."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, answers: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []
        self.sampled: list[list[int]] = []

    def ids(self, text: str) -> list[int]:
        return [*self.tokenizer(text, add_special_tokens=False)["input_ids"], self.stop]

    def __call__(self, address: str, path: str, body: dict[str, Any]) -> Any:
        self.bodies.append(body)
        ids = self.ids(self.answers[len(self.sampled)])
        ids = ids[: body["sampling_params"]["max_tokens"]]
        self.sampled.append(ids)
        finish = "stop" if ids[-1] == self.stop else "length"
        return answer(ids, finish, [("3", 0, len(ids))])

    @property
    def prompts(self) -> list[list[int]]:
        return [list(b["token_ids"]) for b in self.bodies]


def limits(**fields: Any) -> EpisodeLimits:
    settings: dict[str, Any] = {
        "max_turns": 4,
        "max_tokens": 2000,
        "max_new_tokens": 64,
        "env_timeout_s": 5.0,
    }
    return EpisodeLimits(**{**settings, **fields})


def episode_of(
    tokenizer: PreTrainedTokenizerBase, handler: Any, episode_id: str = "e0", **limit: Any
) -> AgentEpisode:
    stop = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    client = make_client(ServerPool([A]), FakeServers(handler), max_model_len=4096)
    return AgentEpisode(
        episode_id,
        Renderer(tokenizer),
        client,
        SamplingParams(temperature=1.0, seed=11, stop_token_ids=(stop,)),
        limits(**limit),
        lambda ids: decode_completion(tokenizer, ids, (stop,)),
        lambda text: encode_prompt(tokenizer, text),
        "sdp-test",
    )


def served(episode: AgentEpisode, agent: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
    """Serve `episode` on a gateway and run `agent` with an openai client on its base URL."""

    async def run() -> T:
        gateway = Gateway("sdp-test")
        await gateway.start()
        try:
            url = gateway.open(episode)
            assert url == f"http://127.0.0.1:{gateway.port}/episodes/{episode.episode_id}/v1"
            async with AsyncOpenAI(base_url=url, api_key="sdp", max_retries=0) as client:
                return await agent(client)
        finally:
            await gateway.aclose()

    return asyncio.run(run())


def test_two_chat_calls_answer_in_openai_shape_and_keep_the_sampled_ids(
    smol: PreTrainedTokenizerBase,
) -> None:
    model = ScriptedModel(smol, ["It is 5.", "Yes, 5."])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> list[Any]:
        messages: list[Any] = [{"role": "user", "content": "What is 2 plus 3?"}]
        first = await client.chat.completions.create(model="m", messages=messages)
        messages += [first.choices[0].message, {"role": "user", "content": "Sure?"}]
        second = await client.chat.completions.create(model="m", messages=messages)
        return [first, second]

    first, second = served(episode, agent)
    assert first.object == "chat.completion" and first.model == "m"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == "It is 5."
    assert first.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Yes, 5."
    renderer = Renderer(smol)
    prompt = renderer.prompt_ids([{"role": "user", "content": "What is 2 plus 3?"}])
    assert model.prompts[0] == prompt
    # The second request is the first one's exact ids, the sampled ids, and only what the new
    # message adds.
    context = prompt + model.sampled[0]
    added = renderer.new_message_ids(context, "assistant", [{"role": "user", "content": "Sure?"}])
    assert model.prompts[1] == context + added
    assert first.usage.prompt_tokens == len(prompt)
    assert first.usage.completion_tokens == len(model.sampled[0])
    assert second.usage.prompt_tokens == len(context + added)
    assert second.usage.total_tokens == len(context + added) + len(model.sampled[1])
    trajectory = episode.trajectory(1.0, "done")
    assert trajectory is not None
    assert trajectory.prompt_ids == prompt
    assert trajectory.output_ids == model.sampled[0] + added + model.sampled[1]
    trained = [True] * len(model.sampled[0]) + [False] * len(added)
    assert trajectory.trained == trained + [True] * len(model.sampled[1])
    assert trajectory.versions == [3] * len(trajectory.output_ids)
    assert [t["role"] for t in trajectory.turns or []] == ["user", "assistant", "user", "assistant"]
    assert episode.n_branches == 1 and episode.final_answer == "Yes, 5."


def test_tool_calls_come_back_in_openai_format_and_tool_results_extend_the_episode(
    smol: PreTrainedTokenizerBase,
) -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    model = ScriptedModel(smol, [call, "The sum is 5."])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> list[Any]:
        messages: list[Any] = [{"role": "user", "content": "Add 2 and 3."}]
        first = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        tool_call = first.choices[0].message.tool_calls[0]
        arguments = json.loads(tool_call.function.arguments)
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": tool_call.id, "content": str(sum(arguments.values()))}
        )
        second = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        return [first, second]

    first, second = served(episode, agent)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0].type == "function"
    assert message.tool_calls[0].function.name == "add"
    assert json.loads(message.tool_calls[0].function.arguments) == {"a": 2, "b": 3}
    assert message.tool_calls[0].id.startswith("call_")
    assert second.choices[0].message.content == "The sum is 5."
    assert second.choices[0].message.tool_calls is None
    assert episode.n_branches == 1
    trajectory = episode.trajectory(1.0, "done")
    assert trajectory is not None
    # The tool call is trained as the model wrote it; the tool result is context.
    assert trajectory.output_ids[: len(model.sampled[0])] == model.sampled[0]
    roles = [(t["role"], t["trained"]) for t in trajectory.turns or []]
    assert roles == [("user", False), ("assistant", True), ("tool", False), ("assistant", True)]
    assert model.prompts[1][: len(model.prompts[0]) + len(model.sampled[0])] == (
        model.prompts[0] + model.sampled[0]
    )


def test_rewritten_history_starts_a_new_branch_and_the_last_calls_branch_is_trained(
    smol: PreTrainedTokenizerBase,
) -> None:
    model = ScriptedModel(smol, ["A1", "B1", "A2"])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> None:
        main: list[Any] = [{"role": "user", "content": "Main task."}]
        a1 = await client.chat.completions.create(model="m", messages=main)
        # A side conversation (a summary, a sub-agent): it extends nothing so far.
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Side task."}]
        )
        # Back on the main conversation: it continues the first branch, not a third one.
        main += [a1.choices[0].message, {"role": "user", "content": "Go on."}]
        await client.chat.completions.create(model="m", messages=main)

    served(episode, agent)
    assert episode.n_branches == 2 and episode.n_calls == 3
    trajectory = episode.trajectory(0.5, "done")
    assert trajectory is not None
    assert trajectory.prompt_ids == model.prompts[0]
    # The main branch holds its two model turns; the side branch's tokens are not in it.
    assert trajectory.output_ids[: len(model.sampled[0])] == model.sampled[0]
    assert trajectory.output_ids[-len(model.sampled[2]) :] == model.sampled[2]
    assert sum(trajectory.trained or []) == len(model.sampled[0]) + len(model.sampled[2])
    side = Renderer(smol).prompt_ids([{"role": "user", "content": "Side task."}])
    assert model.prompts[1] == side


def test_an_edited_assistant_message_is_a_fork(smol: PreTrainedTokenizerBase) -> None:
    model = ScriptedModel(smol, ["first answer", "second answer"])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> None:
        messages: list[Any] = [{"role": "user", "content": "Q"}]
        await client.chat.completions.create(model="m", messages=messages)
        messages += [
            {"role": "assistant", "content": "an answer the model never gave"},
            {"role": "user", "content": "Again"},
        ]
        await client.chat.completions.create(model="m", messages=messages)

    served(episode, agent)
    assert episode.n_branches == 2
    trajectory = episode.trajectory(0.0, "done")
    assert trajectory is not None
    # The new branch's prompt is the whole rewritten history, rendered once; only its one
    # model turn is trained.
    assert trajectory.prompt_ids == model.prompts[1]
    assert trajectory.output_ids == model.sampled[1]


def test_an_answer_sent_back_stripped_still_extends_the_episode(
    smol: PreTrainedTokenizerBase,
) -> None:
    model = ScriptedModel(smol, ["  padded answer \n", "ok"])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> None:
        messages: list[Any] = [{"role": "user", "content": "Q"}]
        first = await client.chat.completions.create(model="m", messages=messages)
        assert first.choices[0].message.content == "  padded answer \n"
        stripped = {"role": "assistant", "content": first.choices[0].message.content.strip()}
        messages += [stripped, {"role": "user", "content": "Again"}]
        await client.chat.completions.create(model="m", messages=messages)

    served(episode, agent)
    assert episode.n_branches == 1
    assert model.prompts[1][: len(model.prompts[0]) + len(model.sampled[0])] == (
        model.prompts[0] + model.sampled[0]
    )


def test_an_abort_mid_call_continues_as_a_new_segment_with_its_versions(
    smol: PreTrainedTokenizerBase,
) -> None:
    renderer_ids = ScriptedModel(smol, []).ids("one two three")
    requests: list[list[int]] = []

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        requests.append(list(body["token_ids"]))
        if len(requests) == 1:
            return answer(renderer_ids[:2], "abort", [("0", 0, 2)])
        return answer(renderer_ids[2:], "stop", [("1", 0, len(renderer_ids) - 2)])

    episode = episode_of(smol, handler)

    async def agent(client: AsyncOpenAI) -> Any:
        messages = [{"role": "user", "content": "Count."}]
        return await client.chat.completions.create(model="m", messages=messages)

    reply = served(episode, agent)
    assert reply.choices[0].message.content == "one two three"
    assert requests[1] == requests[0] + renderer_ids[:2]
    trajectory = episode.trajectory(1.0, "done")
    assert trajectory is not None
    assert trajectory.output_ids == renderer_ids
    assert trajectory.versions == [0, 0] + [1] * (len(renderer_ids) - 2)
    assert trajectory.n_segments == 2


def test_completions_extend_by_text_and_by_ids(smol: PreTrainedTokenizerBase) -> None:
    model = ScriptedModel(smol, [" 4", " 6", " 8"])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> list[Any]:
        first = await client.completions.create(model="m", prompt="2 + 2 =", max_tokens=8)
        text = "2 + 2 =" + first.choices[0].text + "\n3 + 3 ="
        second = await client.completions.create(model="m", prompt=text, max_tokens=8)
        return [first, second]

    first, second = served(episode, agent)
    assert first.object == "text_completion"
    assert first.choices[0].text == " 4" and second.choices[0].text == " 6"
    prompt = encode_prompt(smol, "2 + 2 =")
    assert model.prompts[0] == prompt
    new = list(smol("\n3 + 3 =", add_special_tokens=False)["input_ids"])
    assert model.prompts[1] == prompt + model.sampled[0] + new
    assert episode.n_branches == 1
    assert second.usage.prompt_tokens == len(model.prompts[1])

    ids_model = ScriptedModel(smol, [" 4", " 6"])
    by_ids = episode_of(smol, ids_model, "e1")

    async def ids_agent(client: AsyncOpenAI) -> None:
        await client.completions.create(model="m", prompt=prompt, max_tokens=8)
        extended = prompt + ids_model.sampled[0] + new
        await client.completions.create(model="m", prompt=extended, max_tokens=8)

    served(by_ids, ids_agent)
    assert by_ids.n_branches == 1
    assert ids_model.prompts[1] == prompt + ids_model.sampled[0] + new


def test_max_tokens_is_capped_by_the_run_and_stop_strings_cut_the_turn(
    smol: PreTrainedTokenizerBase,
) -> None:
    model = ScriptedModel(smol, ["a b c d e f g h i j", "x y STOP z w"])
    episode = episode_of(smol, model, max_new_tokens=4)

    async def agent(client: AsyncOpenAI) -> list[Any]:
        messages: list[Any] = [{"role": "user", "content": "Letters."}]
        first = await client.chat.completions.create(model="m", messages=messages, max_tokens=500)
        messages += [first.choices[0].message, {"role": "user", "content": "More."}]
        second = await client.chat.completions.create(
            model="m", messages=messages, max_completion_tokens=3, stop=["STOP"], temperature=0.0
        )
        return [first, second]

    first, second = served(episode, agent)
    assert model.bodies[0]["sampling_params"]["max_tokens"] == 4
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 4
    assert model.bodies[1]["sampling_params"]["max_tokens"] == 3
    # The run's temperature, not the request's: the behaviour logprobs are the run's policy's.
    assert model.bodies[1]["sampling_params"]["temperature"] == 1.0
    assert second.choices[0].finish_reason == "length"
    model3 = ScriptedModel(smol, ["x y STOP z w"])
    cut = episode_of(smol, model3, "e1")

    async def stop_agent(client: AsyncOpenAI) -> Any:
        messages = [{"role": "user", "content": "Letters."}]
        return await client.chat.completions.create(model="m", messages=messages, stop="STOP")

    reply = served(cut, stop_agent)
    assert reply.choices[0].message.content == "x y "
    assert reply.choices[0].finish_reason == "stop"
    trajectory = cut.trajectory(1.0, "done")
    assert trajectory is not None
    kept = trajectory.output_ids
    # Cut after the token that completes STOP: the tokens after it are not kept.
    assert kept == model3.sampled[0][: len(kept)] and len(kept) < len(model3.sampled[0])
    assert "STOP" in smol.decode(kept) and "z" not in smol.decode(kept)


def test_refused_calls_are_openai_errors(smol: PreTrainedTokenizerBase) -> None:
    model = ScriptedModel(smol, ["one", "two"])
    episode = episode_of(smol, model, max_turns=1)
    messages = [{"role": "user", "content": "Hi"}]

    async def agent(client: AsyncOpenAI) -> dict[str, Any]:
        errors: dict[str, Any] = {}
        for name, kwargs in [
            ("n", {"n": 2}),
            ("messages", {"messages": [{"role": "narrator", "content": "x"}]}),
        ]:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="m", **{"messages": messages, **kwargs})
            errors[name] = caught.value
        await client.chat.completions.create(model="m", messages=messages)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=messages)
        errors["turns"] = caught.value
        other = client.with_options(base_url=str(client.base_url).replace("/e0/", "/nope/"))
        with pytest.raises(openai.NotFoundError) as missing:
            await other.chat.completions.create(model="m", messages=messages)
        errors["missing"] = missing.value
        return errors

    errors = served(episode, agent)
    assert errors["n"].body["param"] == "n"
    assert "narrator" in errors["messages"].body["message"]
    assert errors["turns"].body["code"] == "max_turns_exceeded"
    assert episode.limit_hit == "max_turns"
    assert errors["missing"].body["code"] == "episode_not_found"
    assert len(model.bodies) == 1


def test_a_call_past_the_episodes_tokens_is_a_context_length_error(
    smol: PreTrainedTokenizerBase,
) -> None:
    model = ScriptedModel(smol, ["one two three four five six seven"])
    episode = episode_of(smol, model, max_tokens=40)

    async def agent(client: AsyncOpenAI) -> Any:
        messages: list[Any] = [{"role": "user", "content": "Hi"}]
        first = await client.chat.completions.create(model="m", messages=messages)
        messages += [first.choices[0].message, {"role": "user", "content": "word " * 40}]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=messages)
        return caught.value

    error = served(episode, agent)
    assert error.body["code"] == "context_length_exceeded"
    assert episode.limit_hit == "context"
    trajectory = episode.trajectory(0.0, "context")
    assert trajectory is not None and trajectory.output_ids == model.sampled[0]


def test_streamed_calls_get_the_turn_as_openai_chunks(smol: PreTrainedTokenizerBase) -> None:
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    model = ScriptedModel(smol, [call, "It is 5.", " 7"])
    episode = episode_of(smol, model)

    async def agent(client: AsyncOpenAI) -> list[Any]:
        messages: list[Any] = [{"role": "user", "content": "Add 2 and 3."}]
        stream = await client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, stream=True
        )
        tool_chunks = [chunk async for chunk in stream]
        # The SDK's own accumulator turns the chunks back into a message.
        async with client.chat.completions.stream(
            model="m",
            messages=[
                *messages,
                {
                    "role": "assistant",
                    "tool_calls": [
                        tool_chunks[0].choices[0].delta.tool_calls[0].model_dump(exclude={"index"})
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": tool_chunks[0].choices[0].delta.tool_calls[0].id,
                    "content": "5",
                },
            ],
            tools=TOOLS,
            stream_options={"include_usage": True},
        ) as streamed:
            final = await streamed.get_final_completion()
        text = await client.completions.create(model="m", prompt="6 +", stream=True)
        return [tool_chunks, final, [chunk async for chunk in text]]

    tool_chunks, final, text_chunks = served(episode, agent)
    delta = tool_chunks[0].choices[0].delta
    assert delta.role == "assistant" and delta.content is None
    assert delta.tool_calls[0].function.name == "add"
    assert json.loads(delta.tool_calls[0].function.arguments) == {"a": 2, "b": 3}
    assert tool_chunks[-1].choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.content == "It is 5."
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.completion_tokens == len(model.sampled[1])
    assert episode.n_branches == 2  # the chat branch, extended by the tool result; the text one
    assert "".join(c.choices[0].text for c in text_chunks) == " 7"


def test_models_lists_the_served_name(smol: PreTrainedTokenizerBase) -> None:
    episode = episode_of(smol, ScriptedModel(smol, []))

    async def agent(client: AsyncOpenAI) -> list[str]:
        return [m.id async for m in client.models.list()]

    assert served(episode, agent) == ["sdp-test"]
