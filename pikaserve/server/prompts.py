"""Prompts to token ids for the routes.

A text too long to fit the context is refused by its length in characters, before any
tokenizer work (no token covers more characters than the vocabulary's longest entry), and a
long prompt is tokenized on a worker thread: it never stalls the event loop, so health checks
and the streams in flight keep going while it is encoded. A short one (a Pika turn with its
system prompt: ~1,500 characters, 0.4 ms) is tokenized in place, where a thread hop would
cost more than it saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pikaserve.errors import InvalidRequestError

T = TypeVar("T")
INLINE_CHARS = 8192  # ~2 ms of tokenizing: below this, on the event loop


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = max_model_len * tokenizer.max_token_chars

    def check_length(self, chars: Iterable[int], param: str) -> None:
        """Refuses any prompt (given by its length in characters) that cannot fit."""
        if any(n > self.max_chars for n in chars):
            raise InvalidRequestError(
                f"the prompt is longer than the maximum context length of "
                f"{self.max_model_len} tokens, whatever it holds", param)

    async def run(self, work: Callable[[], T], chars: int) -> T:
        """`work` (tokenizing `chars` characters) in place when short, else off the loop."""
        if chars <= INLINE_CHARS:
            return work()
        return await asyncio.to_thread(work)

    async def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                   add_special_tokens: bool = False) -> list[int]:
        return await self._chat_work(messages, lambda: self.tokenizer.encode_chat(
            messages, add_generation_prompt, add_special_tokens))

    async def prompts(self, prompt: str | list[str] | list[int] | list[list[int]], param: str,
                      add_special_tokens: bool = True) -> list[list[int]]:
        """A completion-style prompt (a text, texts, token ids, or lists of them) as one
        token-id list per prompt."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt:
            raise InvalidRequestError(f"{param} must not be empty", param)
        elif isinstance(prompt[0], int):
            return [list(prompt)]
        if not isinstance(prompt[0], str):
            return [list(p) for p in prompt]
        self.check_length(map(len, prompt), param)
        encode = self.tokenizer.encode
        return await self.run(lambda: [encode(p, add_special_tokens=add_special_tokens)
                                       for p in prompt], sum(map(len, prompt)))

    async def head_prompt(self, head: Any, messages: list[dict[str, Any]]
                          ) -> tuple[list[int], int, int]:
        """A classification head's prompt: token ids, span start and split (head.prompt)."""
        return await self._chat_work(messages, lambda: head.prompt(self.tokenizer, messages))

    async def _chat_work(self, messages: list[dict[str, Any]], work: Callable[[], T]) -> T:
        """`work` (rendering and tokenizing `messages`), once the chat is known to fit. Its
        length is its messages' contents (the template adds a bounded few characters)."""
        chars = sum(len(m["content"]) for m in messages)
        self.check_length([chars], "messages")
        return await self.run(work, chars)
