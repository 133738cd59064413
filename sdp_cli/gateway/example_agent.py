"""Example agents for `task.agent`, written against the official `openai` client only: nothing
in them knows about sdp but the base URL they are given.

`answer_then_check` (conf/examples/tiny-openai-agent.yaml) makes two model calls per episode:
it asks the question, then sends the answer back with a request to check it and answer again,
and leaves the scoring of the final answer to the task (returns None).

Agents talking to the gateway should turn the client's retries off (`max_retries=0`): a call
may wait for a weight update, and a retried call whose first try went through would look like a
fork of the conversation.
"""

from __future__ import annotations

from typing import Any

CHECK_PROMPT = "check your answer. give only the final answer:"


async def answer_then_check(base_url: str, model_name: str, instance: dict[str, Any]) -> None:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(
        base_url=base_url, api_key="sdp", max_retries=0, timeout=600.0
    ) as client:
        messages: list[dict[str, Any]] = [{"role": "user", "content": instance["question"]}]
        first = await client.chat.completions.create(model=model_name, messages=messages)
        # Agents usually send the message object back as they got it.
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "user", "content": CHECK_PROMPT})
        await client.chat.completions.create(model=model_name, messages=messages)
    return None
