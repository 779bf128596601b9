"""Encodes text piece by piece between the tokenizer's added tokens, each piece cached.

A fast (Rust) tokenizer first cuts its input at added tokens (<|im_start|>, <|im_end|>, ...)
and encodes the pieces between them independently, so encoding piece by piece gives the same
ids. A chat's system prompt is one such piece, the same in every request: cached, it costs a
dict lookup instead of a fresh encode (a Pika request's ~400-token encode was half the host
time the engine spends on it).

Used only where the cut points are certain: every added token matched as written (not
normalized, no lstrip/rstrip/single-word rules, not split as text), and a few probe texts
encode the same both ways (a SentencePiece-style pre-tokenizer that marks only the input's
first word would not). Other tokenizers encode whole texts.
"""

from __future__ import annotations

import re
from array import array
from typing import Any

# At most ~50 MB however clients vary their messages: pieces kept as compact int arrays, and a
# piece longer than a long system prompt (a pasted document, say) is encoded, not kept.
MAX_ENTRIES = 1024
MAX_CACHED_CHARS = 16384


class SegmentEncoder:
    def __init__(self, backend: Any, added: dict[str, int]) -> None:
        self._backend = backend
        self._added = added
        # longest first: the leftmost-longest match the tokenizer's own splitter makes
        alternatives = sorted(added, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives)))
        self._cache: dict[str, array] = {}

    @classmethod
    def for_tokenizer(cls, hf: Any) -> SegmentEncoder | None:
        """The encoder for a Hugging Face fast tokenizer, or None where pieces cannot be cut
        with certainty (a slow tokenizer, or added tokens with matching rules)."""
        backend = getattr(hf, "backend_tokenizer", None)
        decoder = getattr(hf, "added_tokens_decoder", None)
        if backend is None or not decoder or getattr(hf, "split_special_tokens", False):
            return None
        added = {}
        for token_id, token in decoder.items():
            if (getattr(token, "normalized", True) or getattr(token, "lstrip", True)
                    or getattr(token, "rstrip", True) or getattr(token, "single_word", True)):
                return None
            added[token.content] = token_id
        encoder = cls(backend, added)
        token = next(iter(added))
        probes = [f"{token}Hello world", f"a {token} b", f"{token}\n{token} x\n", "Hi there"]
        if any(encoder.encode(t) != backend.encode(t, add_special_tokens=False).ids
               for t in probes):
            return None
        encoder._cache.clear()
        return encoder

    def encode(self, text: str) -> list[int]:
        """The ids of `text` with no special tokens added (as encode(add_special_tokens=False))."""
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            if match.start() > pos:
                ids += self._piece(text[pos : match.start()])
            ids.append(self._added[match.group()])
            pos = match.end()
        if pos < len(text):
            ids += self._piece(text[pos:])
        return ids

    def _piece(self, piece: str) -> array | list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        encoded = self._backend.encode(piece, add_special_tokens=False).ids
        if len(piece) <= MAX_CACHED_CHARS:
            if len(self._cache) >= MAX_ENTRIES:
                self._cache.clear()
            self._cache[piece] = array("l", encoded)
        return encoded
