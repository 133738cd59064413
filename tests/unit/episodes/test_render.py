"""New messages are rendered on top of a conversation's fixed ids, never re-rendering it
(docs/design.md, Episodes): with the tiny model's plain template, SmolLM2's ChatML template, a
reasoning template that rewrites earlier assistant turns, and a tool template that groups tool
results."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.episodes.render import PLAIN_CHAT_TEMPLATE, Renderer, RenderError
from sdp_cli.model.tiny import build_tokenizer
from tests.unit.gateway.smollm2_tokenizer import smollm2_tokenizer

# Like Qwen3's: an earlier assistant turn loses its reasoning, the last one keeps it.
REASONING_TEMPLATE = (
    "{% for m in messages %}"
    "{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Hermes/Qwen2.5's: consecutive tool results share one user turn.
TOOL_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer(tmp_path_factory)


def chars(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`text` sampled one character per token: valid ids no BPE tokenizer would produce."""
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c))[0] for c in text]


def im_end(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_tiny_plain_template_appends_the_new_turn_after_the_sampled_eos() -> None:
    tokenizer = build_tokenizer()
    renderer = Renderer(tokenizer)
    assert renderer.template == PLAIN_CHAT_TEMPLATE
    prompt = renderer.prompt_ids([{"role": "user", "content": "1+1?"}])
    assert tokenizer.decode(prompt) == "<bos>user: 1+1?<eos>assistant: "
    sampled = [*tokenizer("3", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    added = renderer.new_message_ids(
        prompt + sampled, "assistant", [{"role": "user", "content": "no. again?"}]
    )
    # The sampled EOS ends the turn: nothing of it is written twice.
    assert tokenizer.decode(added) == "user: no. again?<eos>assistant: "
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "no. again?"},
    ]
    # A prefix-stable template with one token per character: equal to a full rendering.
    assert prompt + sampled + added == renderer.prompt_ids(messages)


def test_smollm2_turns_equal_a_full_rendering_when_sampled_canonically(
    smol: PreTrainedTokenizerBase,
) -> None:
    renderer = Renderer(smol)
    messages: list[dict[str, str]] = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids = renderer.prompt_ids(messages)
    for answer, reply in [("It is 5.", "Why?"), ("Because 2 + 3 = 5.", "Thanks!")]:
        sampled = [*smol(answer, add_special_tokens=False)["input_ids"], im_end(smol)]
        new = [{"role": "user", "content": reply}]
        ids = ids + sampled + renderer.new_message_ids(ids + sampled, "assistant", new)
        messages += [{"role": "assistant", "content": answer}, *new]
    assert ids == renderer.prompt_ids(messages)


def test_smollm2_keeps_ids_a_new_rendering_would_tokenize_differently(
    smol: PreTrainedTokenizerBase,
) -> None:
    renderer = Renderer(smol)
    first = [{"role": "user", "content": "Say hello."}]
    prompt = renderer.prompt_ids(first)
    sampled = [*chars(smol, "Hello there"), im_end(smol)]
    context = prompt + sampled
    added = renderer.new_message_ids(context, "assistant", [{"role": "user", "content": "Again"}])
    episode = context + added
    messages = [
        *first,
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Again"},
    ]
    rendered = renderer.prompt_ids(messages)
    # The same text, but re-tokenizing it merges the characters the model sampled one by one.
    assert smol.decode(episode) == smol.decode(rendered)
    assert episode != rendered
    assert episode[: len(context)] == context
    assert smol.decode(added) == "\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"


def test_reasoning_template_that_rewrites_earlier_turns_still_yields_the_sampled_ids(
    smol: PreTrainedTokenizerBase,
) -> None:
    renderer = Renderer(smol, chat_template=REASONING_TEMPLATE)
    first = [{"role": "user", "content": "2+2?"}]
    prompt = renderer.prompt_ids(first)
    answer = "<think>two and two</think> 4"
    sampled = [*smol(answer, add_special_tokens=False)["input_ids"], im_end(smol)]
    context = prompt + sampled
    new = [{"role": "user", "content": "Sure?"}]
    episode = context + renderer.new_message_ids(context, "assistant", new)
    rerendered = renderer.prompt_ids([*first, {"role": "assistant", "content": answer}, *new])
    # The template drops the earlier turn's reasoning: its rendering no longer starts with the
    # ids the model was sampled on, while the episode's do, reasoning included.
    assert rerendered[: len(context)] != context
    assert "two and two" not in smol.decode(rerendered)
    assert episode[: len(context)] == context
    assert smol.decode(episode[len(context) :]) == (
        "\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_truncated_turn_gets_the_templates_end_of_turn(smol: PreTrainedTokenizerBase) -> None:
    renderer = Renderer(smol)
    prompt = renderer.prompt_ids([{"role": "user", "content": "Count."}])
    cut = smol("1 2 3 4", add_special_tokens=False)["input_ids"]  # no end-of-turn: cut by length
    added = renderer.new_message_ids(prompt + cut, "assistant", [{"role": "user", "content": "Go"}])
    assert smol.decode(added).startswith("<|im_end|>\n<|im_start|>user\nGo")


def test_consecutive_tool_results_are_rendered_as_the_template_groups_them(
    smol: PreTrainedTokenizerBase,
) -> None:
    renderer = Renderer(smol, chat_template=TOOL_TEMPLATE)
    first = [{"role": "user", "content": "Add 2 and 3, then 4 and 5."}]
    prompt = renderer.prompt_ids(first)
    call = '<tool_call>{"name": "add"}</tool_call>'
    sampled = [*smol(call, add_special_tokens=False)["input_ids"], im_end(smol)]
    context = prompt + sampled
    results = [
        {"role": "tool", "content": "5", "tool_call_id": "a"},
        {"role": "tool", "content": "9", "tool_call_id": "b"},
    ]
    added = renderer.new_message_ids(context, "assistant", results)
    assert smol.decode(added) == (
        "\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    full = renderer.prompt_ids([*first, {"role": "assistant", "content": call}, *results])
    assert context + added == full


def test_a_template_that_drops_the_content_cannot_render_incrementally() -> None:
    renderer = Renderer(build_tokenizer(), chat_template="{{ bos_token }}x")
    with pytest.raises(RenderError, match="previous message's content"):
        renderer.new_message_ids([1], "assistant", [{"role": "user", "content": "hi"}])


def test_unknown_role_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="role must be one of"):
        Renderer(build_tokenizer()).new_message_ids([1], "narrator", [])
