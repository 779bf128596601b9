"""Incremental detokenization with stop strings.

Text is decoded over a short sliding window of tokens so that tokenizers which render a token
differently at the start of a string (SentencePiece's leading space) and multi-byte characters
split across tokens both come out right. Text that might still become part of a stop string is
held back until it can no longer match.
"""

from __future__ import annotations

from typing import Protocol

WINDOW = 6  # tokens of left context used when decoding a new token


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far, cut at a stop string
        self.emitted = 0  # characters of self.text already handed out

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append generated tokens; returns the stop string hit, if any."""
        for token_id in token_ids:
            self.ids.append(token_id)
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            full = self.tokenizer.decode(self.ids[self.prefix_offset :])
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                continue  # an incomplete character (or nothing visible yet): wait for more
            before = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            hit = self._find_stop(before)
            if hit is not None:
                return hit
        return None

    def _find_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        start = max(0, before - self.holdback)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; keeps a possible stop-string start back unless finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
