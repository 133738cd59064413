"""OpenAI chat messages in and out of the gateway: one normal form to compare a call's history
with the episode's context, the form chat templates render, and tool calls found in the model's
text.

Agents send back what they got in many spellings (the `openai` client's pydantic models dumped
with `refusal: None`, `content: None` for a tool call, text as a list of parts, arguments
re-serialised with other spacing). Two messages are the same when their normal forms are equal:
role (`developer` is `system`), text (an assistant's without surrounding whitespace), tool calls
(name, id, arguments compared as JSON), the tool call a result answers, and the name.

Tool calls: a model writes them in its chat template's syntax; the one understood here is the
Hermes/Qwen syntax, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (JSON inside the
tags), which templates with tool support (Qwen2.5, Qwen3, Hermes, SmolLM3) write. A block that is
not valid JSON with a name stays in the text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sdp_cli.tasks.environment import ChatMessage

ROLE_ALIASES = {"developer": "system", "function": "tool"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class MessageError(ValueError):
    """A request's messages are not OpenAI chat messages (answered with HTTP 400)."""


def text_of(content: Any) -> str:
    """A message's text: a string, None (a tool call without text), or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text"):
                raise MessageError("only text content parts are supported (no images or audio)")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise MessageError(f"message content must be a string or a list of parts, not {content!r:.60}")


def _arguments(value: Any) -> Any:
    """Arguments as JSON values when they parse, so re-serialised spacing compares equal."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def normal_tool_calls(calls: Any) -> list[dict[str, Any]]:
    if not calls:
        return []
    if not isinstance(calls, list):
        raise MessageError("tool_calls must be a list")
    normal = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            raise MessageError("a tool call needs function.name")
        normal.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {
                    "name": str(function["name"]),
                    "arguments": _arguments(function.get("arguments", {})),
                },
            }
        )
    return normal


def normal_message(message: Any) -> ChatMessage:
    """The normal form of one chat message (MessageError when it is not one)."""
    if not isinstance(message, Mapping):
        raise MessageError(f"a message must be an object, not {message!r:.60}")
    role = ROLE_ALIASES.get(str(message.get("role")), str(message.get("role")))
    if role not in CHAT_ROLES:
        raise MessageError(f"message role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
    content = text_of(message.get("content"))
    # Agents often strip the model's answer before sending it back; the ids hold it as sampled.
    normal: ChatMessage = {
        "role": role,
        "content": content.strip() if role == "assistant" else content,
    }
    calls = normal_tool_calls(message.get("tool_calls"))
    if calls:
        normal["tool_calls"] = calls
    if role == "tool":
        normal["tool_call_id"] = str(message.get("tool_call_id") or "")
    if message.get("name"):
        normal["name"] = str(message["name"])
    return normal


def normal_messages(messages: Any) -> list[ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list")
    return [normal_message(m) for m in messages]


def extends(messages: Sequence[ChatMessage], context: Sequence[ChatMessage]) -> bool:
    """Whether `messages` start with the whole of `context` (both in normal form)."""
    return len(messages) >= len(context) and list(messages[: len(context)]) == list(context)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The model's text without its tool call blocks, and the calls in OpenAI's format
    (arguments as a JSON string, a fresh id per call)."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return match.group(0)
        arguments = body.get("arguments", body.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": body["name"],
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
        return ""

    rest = TOOL_CALL_BLOCK.sub(take, text)
    return (rest.strip() if calls else text), calls
