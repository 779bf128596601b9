"""Prompt lookup (vLLM's "ngram" speculative decoding): a request proposes the tokens that
followed the last earlier occurrence of its last n tokens, and its next pass checks them
(engine/drafts.py). It pays off where an answer repeats its context: quoting, editing, code.

Each request keeps an index of where each of its n-grams (prompt_lookup_min <= n <=
prompt_lookup_max) last ended, extended by the tokens appended since its last proposal, so a
proposal costs a few dict lookups however long the context is; the prompt is indexed once.

Proposals cost rows in a pass, so they stop where they do not pay: a request whose recent
proposals were mostly rejected (a moving average of the share accepted, starting at the bar,
below min_acceptance) waits before its next one (1 step, then 4, 16, ... up to MAX_BACKOFF,
back to none once the average recovers), and no request proposes while more than
disable_by_batch_size run. The bar rises with the batch: the more requests share a pass, the
cheaper each of its tokens already is, and the more a proposal's extra rows weigh against
what it saves.
"""

from __future__ import annotations

from pikaserve.config import SpeculativeConfig
from pikaserve.engine.constraint import Draft
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


MAX_BACKOFF = 64  # steps a request at most waits between proposals
MIN_ACCEPTANCE = 0.4  # below this average share of accepted tokens, a request backs off
# Per running request, the share of a proposal that must be accepted to pay for its rows.
# Measured on this project's 2-core CPU (default model): a row costs ~1.1 ms against a pass
# of 13 ms at 4 requests and 18 ms at 8, so proposals broke even at ~0.33 and ~0.5 accepted.
ACCEPTANCE_PER_REQUEST = 0.07


def min_acceptance(num_running: int) -> float:
    """The average share accepted below which a request backs off, with `num_running`
    requests in the batch."""
    return max(MIN_ACCEPTANCE, ACCEPTANCE_PER_REQUEST * num_running)


class ProposalState:
    """A request's prompt-lookup state: its n-gram index and its backoff."""

    __slots__ = ("index", "acceptance", "wait", "backoff")

    def __init__(self, lo: int, hi: int) -> None:
        self.index = NgramIndex(lo, hi)
        # moving average of the share of a proposal accepted; a first miss already backs off
        self.acceptance = MIN_ACCEPTANCE
        self.wait = 0  # steps left before it proposes again
        self.backoff = 0  # the wait after its next poorly accepted proposal

    def checked(self, accepted: int, proposed: int, bar: float = MIN_ACCEPTANCE) -> None:
        """Its last proposal was checked: `accepted` of its `proposed` tokens were sampled
        the same; below `bar` (min_acceptance) on average, it waits."""
        self.acceptance = (self.acceptance + accepted / proposed) / 2
        if self.acceptance >= bar:
            self.backoff = 0
        else:
            self.backoff = min(max(1, 4 * self.backoff), MAX_BACKOFF)
            self.wait = self.backoff


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.num_tokens = config.num_speculative_tokens
        self.lo, self.hi = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_batch = config.disable_by_batch_size
        self.max_model_len = max_model_len

    def propose(self, req: Request, num_running: int) -> Draft | None:
        """A proposal for the next pass of a running request without a grammar (a grammar
        makes drafts of its own), or None. It is cut so that every token of it can be used:
        the row after its last token samples one more, so that token must be allowed too
        (max_tokens, the context)."""
        if req.finish_reason is not None or req.constraint is not None or num_running > self.max_batch:
            return None
        if req.proposal_state is None:
            req.proposal_state = ProposalState(self.lo, self.hi)
        state = req.proposal_state
        if state.wait:
            state.wait -= 1
            return None
        room = self.max_model_len - req.num_tokens - 1
        max_tokens = req.sampling.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - len(req.output_token_ids) - 1)
        k = min(self.num_tokens, room)
        if k < 1:
            return None
        tokens = state.index.continuation(req.all_token_ids, k)
        return Draft(tokens, None, verify_each=True) if tokens else None
