"""Prompt lookup (vLLM's "ngram" speculative decoding): a request proposes the tokens that
followed the last earlier occurrence of its last n tokens, and its next pass checks them
(engine/drafts.py). It pays off where an answer repeats its context: quoting, editing, code.

Each request keeps an index of where each of its n-grams (prompt_lookup_min <= n <=
prompt_lookup_max) last ended, extended by the tokens appended since its last proposal, so a
proposal costs a few dict lookups however long the context is; the prompt is indexed once.
Which requests propose, and when proposing stops paying: engine/proposer.py.
"""

from __future__ import annotations

from pikaserve.config import SpeculativeConfig
from pikaserve.engine.proposer import Proposer, Wanted
from pikaserve.engine.request import Request


class NgramIndex:
    """Where each n-gram of a growing token list last ended, for n in [lo, hi]."""

    __slots__ = ("lo", "hi", "last_end", "num_indexed")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        # last_end[n - lo]: n-gram -> the position of its last token, latest occurrence
        self.last_end: list[dict[tuple[int, ...], int]] = [{} for _ in range(lo, hi + 1)]
        self.num_indexed = 0  # the n-grams ending before this position are in

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the last earlier occurrence of the longest suffix of
        `tokens` (lo to hi long) that occurred before; [] when none did."""
        last = len(tokens) - 1
        self._extend(tokens, last)  # not the n-grams ending at the last token: the suffixes
        for n in range(min(self.hi, last), self.lo - 1, -1):
            end = self.last_end[n - self.lo].get(tuple(tokens[last + 1 - n :]))
            if end is not None:
                break
        else:
            return []
        # An occurrence close to the end runs into the proposal itself: copy on from it, as
        # the text would go on if it kept repeating ("a a a a" proposes k more "a").
        out: list[int] = []
        for src in range(end + 1, end + 1 + k):
            out.append(tokens[src] if src <= last else out[src - last - 1])
        return out

    def _extend(self, tokens: list[int], end: int) -> None:
        """Indexes the n-grams ending before position `end`."""
        lo, hi = self.lo, self.hi
        for i in range(self.num_indexed, end):
            for n in range(lo, min(hi, i + 1) + 1):
                self.last_end[n - lo][tuple(tokens[i + 1 - n : i + 1])] = i
        self.num_indexed = max(self.num_indexed, end)


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_pass_rows: int = 0,
                 row_block: int = 1) -> None:
        super().__init__(config, max_model_len, max_pass_rows, row_block)
        if config.prompt_lookup_min is None or config.prompt_lookup_max is None:
            raise ValueError("prompt lookup needs prompt_lookup_min and prompt_lookup_max")
        self.lo, self.hi = config.prompt_lookup_min, config.prompt_lookup_max

    def memory_for(self, req: Request) -> NgramIndex:
        return NgramIndex(self.lo, self.hi)

    def continuations(self, wanted: Wanted) -> list[list[int]]:
        return [state.memory.continuation(req.all_token_ids, k) for req, state, k in wanted]
