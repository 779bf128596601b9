"""What llguidance needs to know about one tokenizer, built once per tokenizer.

Holds the llguidance tokenizer (its token trie: ~1 s to build for a 49k vocabulary, so it is
built once and shared by every grammar and request), the end-of-sequence ids, and a cache of
canonical-tokenization checks (see `is_canonical`).
"""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf

from pikaserve.errors import InvalidRequestError

_CANONICAL_CACHE_LIMIT = 1 << 16


class TokenizerInfo:
    def __init__(self, tokenizer: Any) -> None:
        hf = getattr(tokenizer, "hf", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
        if not eos and hf.eos_token_id is not None:
            eos = [hf.eos_token_id]
        try:
            self.ll = llguidance.hf.from_tokenizer(hf, eos_token=eos or None)
        except ValueError as exc:  # a slow (Python) tokenizer: llguidance needs the Rust one
            raise InvalidRequestError(
                f"structured output is not available for this tokenizer: {exc}", "structured_outputs"
            ) from exc
        self.vocab_size: int = self.ll.vocab_size
        self.eos_token_ids: list[int] = list(self.ll.eos_tokens)
        self._canonical: dict[tuple[tuple[int, ...], int, bytes], bool] = {}

    def is_special(self, token: int) -> bool:
        return self.ll.is_special_token(token)

    def is_canonical(self, context: tuple[int, ...], token: int, forced: bytes) -> bool:
        """Would the tokenizer itself emit `token` after `context`, given that the bytes
        `forced` must follow it? True when tokenizing context + token + forced starts with
        exactly context + [token]. Pure function of its arguments, so cached."""
        key = (context, token, forced)
        hit = self._canonical.get(key)
        if hit is None:
            expect = [*context, token]
            got = self.ll.tokenize_bytes(self.ll.decode_bytes(expect) + forced)
            hit = got[: len(expect)] == expect
            if len(self._canonical) >= _CANONICAL_CACHE_LIMIT:
                self._canonical.clear()
            self._canonical[key] = hit
        return hit

