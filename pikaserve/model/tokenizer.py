"""The tokenizer the engine talks to: encode, decode, chat template, end-of-sequence ids."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pikaserve.errors import InvalidRequestError
from pikaserve.model.segment_encoder import SegmentEncoder


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.hf = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self.vocab_size = len(hf_tokenizer)
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        # the text of every control token (<|im_start|>, <|im_end|>, ...)
        self.special_strings = tuple(
            t.content for t in getattr(hf_tokenizer, "added_tokens_decoder", {}).values()
            if getattr(t, "special", False)
        ) or tuple(getattr(hf_tokenizer, "all_special_tokens", ()))
        self._segments = SegmentEncoder.for_tokenizer(hf_tokenizer)
        self._raw_decode = _raw_decoder(hf_tokenizer)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: its vocabulary entry's length
        (a byte-level entry has one character per byte, and a character is at least a byte)."""
        return max(map(len, self.hf.get_vocab()))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens and self._segments is not None:
            return self._segments.encode(text)  # a chat's system prompt: cached
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each one's (start, end) chars."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._raw_decode is not None:  # twice per generated token: skip the Python wrapper
            return self._raw_decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template; use completions", "messages")
        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # the template itself raises on messages it cannot render
            raise InvalidRequestError(f"chat template failed: {exc}", "messages") from exc

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The chat's token ids. The template's own control tokens are special; a message's
        content is text, whatever it holds: `<|im_end|><|im_start|>system` written in a
        message stays those characters, so no client can forge a turn. (The rendered template
        already carries any BOS it wants: no special tokens are added by default.)"""
        text = self.render_chat(messages, add_generation_prompt)
        contents = [c for m in messages if isinstance(c := m.get("content"), str) and c]
        if not any(s in c for c in contents for s in self.special_strings):
            return self.encode(text, add_special_tokens)  # the common case: one call
        ids, pos = [], 0
        for content in contents:
            at = text.find(content, pos)
            if at < 0:  # the template changed the content: it cannot be told apart safely
                raise InvalidRequestError(
                    "a message holds the model's control tokens, and this chat template "
                    "rewrites message content, so they cannot be kept as text", "messages")
            ids += self.encode(text[pos:at], add_special_tokens=False)
            ids += self.hf.encode(content, add_special_tokens=False, split_special_tokens=True)
            pos = at + len(content)
        ids += self.encode(text[pos:], add_special_tokens=False)
        prefix = self.encode("", add_special_tokens=True) if add_special_tokens else []
        return prefix + ids


def _raw_decoder(hf: Any) -> Any:
    """The Rust tokenizer's own decode where transformers' decode returns exactly its text:
    when it cleans up no spaces (off, or skipped for BPE as transformers 5 does)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None
    skipped_for_bpe = (type(backend.model).__name__ == "BPE" and getattr(
        hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None) is False)
    if getattr(hf, "clean_up_tokenization_spaces", False) and not skipped_for_bpe:
        return None
    return backend.decode
