"""PromptEncoder: a text that cannot fit is refused by its length before any tokenizer work,
and the tokenizer runs off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pikaserve.errors import InvalidRequestError
from pikaserve.server.prompts import INLINE_CHARS, PromptEncoder


class FakeTokenizer:
    max_token_chars = 4

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return [1] * -(-len(text) // 4)

    def encode_chat(self, messages, add_generation_prompt=True, add_special_tokens=False):
        return self.encode("".join(m["content"] for m in messages))


def test_too_long_text_is_refused_without_tokenizing():
    tok = FakeTokenizer()
    enc = PromptEncoder(tok, max_model_len=10)  # at most 40 characters can fit
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        asyncio.run(enc.prompts("x" * 41, "prompt"))
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        asyncio.run(enc.prompts(["ok", "x" * 41], "prompt"))
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        asyncio.run(enc.chat([{"role": "user", "content": "x" * 30},
                              {"role": "user", "content": "y" * 11}]))
    assert tok.threads == []
    assert asyncio.run(enc.prompts("x" * 40, "prompt")) == [[1] * 10]


def test_long_prompts_are_tokenized_off_the_event_loop():
    tok = FakeTokenizer()
    enc = PromptEncoder(tok, max_model_len=10_000)
    long = "x" * (INLINE_CHARS + 1)

    async def both():
        loop_thread = threading.current_thread()
        await enc.chat([{"role": "user", "content": long}])
        await enc.prompts([long, "b"], "prompt")
        await enc.prompts("short", "prompt")  # in place: a thread hop costs more
        return loop_thread

    loop_thread = asyncio.run(both())
    assert len(tok.threads) == 4
    assert loop_thread not in tok.threads[:3] and tok.threads[3] is loop_thread


def test_token_id_prompts_pass_through():
    enc = PromptEncoder(FakeTokenizer(), max_model_len=10)
    assert asyncio.run(enc.prompts([5, 6], "prompt")) == [[5, 6]]
    assert asyncio.run(enc.prompts([[5], [6, 7]], "prompt")) == [[5], [6, 7]]
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        asyncio.run(enc.prompts([], "prompt"))
