"""How a task's question becomes prompt token ids: through the tokenizer's chat template when it
has one, as plain text otherwise; and which tokens end a completion.

The prompt is tokenized once, here; the token ids (never the text) go to vLLM, so the server
cannot tokenize it differently. An instruct model answers one turn and then writes its
end-of-turn token, which must stop generation even when it is not the tokenizer's EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks.base import encode_prompt

CHAT_TEMPLATE_MODES = ("auto", "true", "false")
# A reply no tokenizer will split into special tokens; what follows it in a rendered
# conversation is the template's end-of-turn marker.
_PROBE_REPLY = "sdp probe reply 7"


def chat_template_mode(value: Any) -> str:
    """`task.chat_template` as one of auto/true/false (YAML may hand over a bool)."""
    mode = str(value).strip().lower()
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(
            "task.chat_template",
            f"'{value}' is not a chat template mode",
            "use one of auto, true, false",
        )
    return mode


def _token_ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a BatchEncoding in recent transformers, a list in older ones.
    if isinstance(encoded, Sequence) and not isinstance(encoded, str):
        return [int(i) for i in encoded]
    return [int(i) for i in encoded["input_ids"]]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant reply, if any."""
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": _PROBE_REPLY},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(rendered, str) or _PROBE_REPLY not in rendered:
        return None
    after = rendered.split(_PROBE_REPLY, 1)[1]
    ids = list(tokenizer(after, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


@dataclass(frozen=True)
class PromptFormat:
    """Turns a question into (prompt text, prompt ids) and knows the stop tokens."""

    tokenizer: PreTrainedTokenizerBase
    use_chat_template: bool = False
    system_prompt: str | None = None

    @classmethod
    def from_config(cls, cfg: TaskConfig, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        mode = chat_template_mode(cfg.chat_template)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "true" and not has_template:
            raise ConfigError(
                "task.chat_template",
                "the model's tokenizer has no chat template",
                "use task.chat_template=auto or false with this model",
            )
        use = has_template if mode == "auto" else mode == "true"
        return cls(tokenizer, use_chat_template=use, system_prompt=cfg.system_prompt or None)

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question}]

    def encode(self, question: str) -> tuple[str, list[int]]:
        """The text the model sees and its token ids."""
        if not self.use_chat_template:
            text = f"{self.system_prompt}\n{question}" if self.system_prompt else question
            return text, encode_prompt(self.tokenizer, text)
        encoded = self.tokenizer.apply_chat_template(
            self.messages(question), add_generation_prompt=True, tokenize=True
        )
        ids = _token_ids(encoded)
        # The template writes its own special tokens (BOS included); text is for people.
        return self.tokenizer.decode(ids), ids

    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS, plus the template's end-of-turn token when the chat template is in use."""
        stops: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            stops.append(int(self.tokenizer.eos_token_id))
        if self.use_chat_template:
            turn_end = end_of_turn_id(self.tokenizer)
            if turn_end is not None and turn_end not in stops:
                stops.append(turn_end)
        return tuple(stops)


def plain_format(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """No chat template, no system prompt: the prompt text is tokenized as it is."""
    return PromptFormat(tokenizer)
