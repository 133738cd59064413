"""The token ids that new messages add to a conversation whose ids are fixed.

Chat templates are not prefix-stable: rendering messages 1..k+1 need not start with the
rendering of 1..k (a reasoning template drops earlier turns' thinking, a template rewrites the
last assistant turn, and tokenizing a whole conversation again can merge characters across a turn
boundary differently from what the model sampled). So an episode never renders its conversation
again. `Renderer.new_message_ids` renders only what new messages add (docs/design.md, Episodes,
"New messages, not a new rendering"):

- the template is applied to a short *anchor* conversation that ends with a placeholder message
  of the previous turn's role, once alone and once followed by the new messages (and the
  generation prompt);
- everything the second rendering writes after the placeholder's content is what the new
  messages add: the end of the previous turn (the template's end-of-turn glue), the new
  messages, the generation prompt;
- the part of that end-of-turn glue the episode already holds (the model sampled its
  end-of-turn token and stopped) is not added twice: the longest start of the glue's ids that
  the episode's ids already end with is skipped.

The earlier turns' ids are never touched, so the model is trained on exactly the ids it sampled.

A tokenizer without a chat template (the built-in tiny model's) gets `PLAIN_CHAT_TEMPLATE`:
`role: content` turns, each ended by EOS, written with characters the tiny alphabet has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]

# `role: content<eos>` per message, then `assistant: ` to generate; EOS ends a turn, so a model
# that stops at EOS has written its own end of turn.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{{ message['content'] if message['content'] is string else '' }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

# Placeholder contents no template rewrites (no surrounding spaces to strip, no think tags);
# `_ANCHOR` marks the previous turn, the others only fill the turns some templates need
# before it (a conversation that starts with a user, a tool result after an assistant turn).
_ANCHOR = "sdp-anchor-previous-7f3a"
_ANCHOR_USER = "sdp-anchor-user-7f3a"
_ANCHOR_ASSISTANT = "sdp-anchor-assistant-7f3a"


class RenderError(ValueError):
    """The chat template cannot render the messages incrementally (it raised, or it writes the
    previous turn so that no placeholder survives)."""


def _anchor(role: str) -> list[dict[str, Any]]:
    """A short conversation ending with a placeholder message of `role`, shaped as templates
    expect one (most want a user turn first; a tool result follows an assistant turn)."""
    user = {"role": "user", "content": _ANCHOR_USER}
    if role == "system":
        return [{"role": "system", "content": _ANCHOR}]
    if role == "user":
        return [{"role": "user", "content": _ANCHOR}]
    if role == "assistant":
        return [user, {"role": "assistant", "content": _ANCHOR}]
    if role == "tool":
        return [
            user,
            {"role": "assistant", "content": _ANCHOR_ASSISTANT},
            {"role": "tool", "content": _ANCHOR, "tool_call_id": "sdp-anchor"},
        ]
    raise RenderError(f"role must be one of system, user, assistant, tool; got {role!r}")


def _overlap(context_ids: Sequence[int], glue_ids: Sequence[int]) -> int:
    """The longest k such that the context ends with the first k ids of the glue."""
    for k in range(min(len(glue_ids), len(context_ids)), 0, -1):
        if list(context_ids[-k:]) == list(glue_ids[:k]):
            return k
    return 0


@dataclass(frozen=True)
class Renderer:
    """Renders messages with one tokenizer's chat template (or `chat_template`, or
    PLAIN_CHAT_TEMPLATE when the tokenizer has none)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None

    @property
    def template(self) -> str:
        own = getattr(self.tokenizer, "chat_template", None)
        return self.chat_template or (own if isinstance(own, str) else None) or PLAIN_CHAT_TEMPLATE

    def text(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The template's text for `messages` (for a first prompt, and for people)."""
        try:
            rendered = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tools=[dict(t) for t in tools] if tools else None,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja2 raises its own errors, templates raise_exception()
            raise RenderError(f"the chat template cannot render these messages: {exc}") from exc
        if not isinstance(rendered, str):
            raise RenderError("the chat template did not render to text")
        return rendered

    def encode(self, text: str) -> list[int]:
        """Ids of rendered text: the template writes its own special tokens (BOS included)."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The ids of a first prompt: the whole rendering, once, at the episode's start."""
        return self.encode(self.text(messages, add_generation_prompt, tools))

    def new_message_ids(
        self,
        context_ids: Sequence[int],
        previous_role: str,
        new_messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The ids to append to `context_ids` (whose last turn has `previous_role`) so that
        they hold `new_messages` and, with `add_generation_prompt`, the start of a model turn.
        The ids of `context_ids` are kept as they are."""
        anchor = _anchor(previous_role)
        alone = self.text(anchor, add_generation_prompt=False, tools=tools)
        extended = self.text([*anchor, *new_messages], add_generation_prompt, tools)
        glue = _after_anchor(alone)
        added = _after_anchor(extended)
        # A template may end the previous turn differently when more follows: the glue is
        # what both renderings write after it.
        glue = _common_start(glue, added)
        glue_ids = self.encode(glue)
        skip = _overlap(context_ids, glue_ids)
        return glue_ids[skip:] + self.encode(added[len(glue) :])


def _common_start(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _after_anchor(rendered: str) -> str:
    """What a rendering writes after the previous turn's placeholder content."""
    at = rendered.find(_ANCHOR)
    if at < 0:
        raise RenderError(
            "the chat template does not write the previous message's content as given, so "
            "the ids new messages add cannot be found"
        )
    return rendered[at + len(_ANCHOR) :]
