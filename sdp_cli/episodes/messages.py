"""Environment messages → the token ids they add to an episode, for the built-in workflow.

The rendering itself is `render.Renderer`'s (the one the OpenAI gateway uses): the first
messages are rendered whole, once; later ones only as what they add after the episode's exact
ids, never the conversation again. This adapter adds what a task's config asks for:
`task.system_prompt` before the first messages, and the chat template or, with
`task.chat_template=false` or a tokenizer without one, render.PLAIN_CHAT_TEMPLATE.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdp_cli.episodes.render import PLAIN_CHAT_TEMPLATE, Renderer
from sdp_cli.errors import SdpError
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.environment import ChatMessage


class MessageFormat:
    def __init__(self, prompt_format: PromptFormat) -> None:
        self.system_prompt = prompt_format.system_prompt
        template = None if prompt_format.use_chat_template else PLAIN_CHAT_TEMPLATE
        self.renderer = Renderer(prompt_format.tokenizer, chat_template=template)

    def first(self, messages: Sequence[ChatMessage]) -> tuple[str, list[int]]:
        """Text and ids of the episode's first prompt, ending with the generation prompt."""
        if not messages:
            raise SdpError("the environment's reset() returned no messages")
        system = []
        if self.system_prompt and messages[0].get("role") != "system":
            system = [{"role": "system", "content": self.system_prompt}]
        text = self.renderer.text([*system, *messages], add_generation_prompt=True)
        return text, self.renderer.encode(text)

    def after_model(self, context_ids: Sequence[int], messages: Sequence[ChatMessage]) -> list[int]:
        """The ids `messages` add after a model turn that ends `context_ids`, ending with the
        generation prompt of the next model turn."""
        return self.renderer.new_message_ids(context_ids, "assistant", messages)
