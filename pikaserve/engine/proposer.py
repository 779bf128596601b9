"""Speculative proposals: after each step, running requests without a grammar guess their next
few tokens, and their next pass checks them (engine/drafts.py). The proposers are prompt lookup
(engine/ngram.py) and a draft model (engine/draft_model.py); what they share is here: which
requests propose, how many tokens at most, and when proposing stops paying.

Proposals cost rows in a pass, so they stop where they do not pay: a request whose recent
proposals were mostly rejected (a moving average of the share accepted, starting at the bar,
below min_acceptance) waits before its next one (1 step, then 4, 16, ... up to MAX_BACKOFF,
back to none once the average recovers), and no request proposes while more than
disable_by_batch_size run. The bar rises with the batch: the more requests share a pass, the
cheaper each of its tokens already is, and the more a proposal's extra rows weigh against
what it saves. For the same reason a proposal is only as long as its tokens are likely to come
true (proposal_length): a request whose proposals are mostly rejected probes with one token.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pikaserve.config import SpeculativeConfig
from pikaserve.engine.constraint import Draft
from pikaserve.engine.request import Request

MAX_BACKOFF = 64  # steps a request at most waits between proposals
MIN_ACCEPTANCE = 0.4  # below this average share of accepted tokens, a request backs off
# The share of a proposed token that must come true to pay for its row: this much per running
# request, at most ROW_SHARE_MAX. Measured on this project's 2-core CPU (default model, the
# compiled CPU kernels): decode passes of 1, 2, 4, 8 and 12 rows took 6.5, 7.6, 8.7, 13.5 and
# 17.2 ms, so a row added to a pass of n requests cost 0.15-0.17 of a token's share at n <= 2
# and 0.49-0.55 from n = 4 on (the 4-bit matmuls leave pure streaming past a few rows).
ACCEPTANCE_PER_REQUEST = 0.14
ROW_SHARE_MAX = 0.55


def row_share(num_running: int) -> float:
    """The acceptance a proposed token needs to pay for its row, with `num_running` requests
    in the batch."""
    return min(ACCEPTANCE_PER_REQUEST * num_running, ROW_SHARE_MAX)


def min_acceptance(num_running: int) -> float:
    """The average share accepted below which a request backs off, with `num_running`
    requests in the batch."""
    return max(MIN_ACCEPTANCE, row_share(num_running))


def proposal_length(acceptance: float, num_running: int, most: int) -> int:
    """How many tokens a request with this average acceptance proposes: its i-th token comes
    true with about acceptance**i, and is worth its row while that is at least the row's
    share (row_share). At least one: a probe."""
    row_cost = row_share(num_running)
    k = 1
    while k < most and acceptance ** (k + 1) >= row_cost:
        k += 1
    return k


Wanted = list[tuple[Request, "ProposalState", int]]  # (request, its state, tokens to propose)


def fit_blocks(lengths: list[int], acceptances: list[float], num_running: int,
               block: int) -> list[int]:
    """The step's proposal lengths cut so that the pass ends on a full block of `block` rows,
    where the model's matmul kernels multiply rows a block at a time and a block costs about
    as much part-filled as full (torch's int4 CPU kernel: model/llama.py, INT4_ROW_BLOCK).
    Drafts fill the rows the running requests leave free in their last block, and open a new
    block only when they fill it; the least likely tokens go first (a request's i-th comes
    true with about acceptance**i). At batch 1 with 4 speculative tokens a pass verifies 3."""
    total = sum(lengths)
    free = -num_running % block
    keep = total if total <= free else free + (total - free) // block * block
    if keep == total:
        return lengths
    likely = sorted(((acceptances[j] ** (i + 1), j) for j, k in enumerate(lengths)
                     for i in range(k)), reverse=True)[:keep]
    counts = Counter(j for _, j in likely)
    return [counts[j] for j in range(len(lengths))]


class ProposalState:
    """A request's proposal state: its backoff, and what its proposer keeps of it between
    proposals (`memory`: prompt lookup's n-gram index, the draft model's KV blocks)."""

    __slots__ = ("memory", "acceptance", "wait", "backoff")

    def __init__(self, memory: Any = None) -> None:
        self.memory = memory
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


class Proposer:
    """Sets the drafts of a step's proposing requests; subclasses say what they propose."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_pass_rows: int,
                 row_block: int = 1) -> None:
        """`max_pass_rows`: past this many rows a pass gets dearer per row (the CPU's 4-bit
        kernels stop), so a step's proposals stay within it; 0: no such edge. `row_block`:
        the rows the model's matmul kernels multiply together (fit_blocks)."""
        self.num_tokens = config.num_speculative_tokens
        self.max_batch = config.disable_by_batch_size
        self.max_model_len = max_model_len
        self.max_pass_rows = max_pass_rows
        self.row_block = row_block

    def propose(self, reqs: list[Request], num_running: int) -> None:
        """Gives each of `reqs` (running, just sampled) that may propose a draft for its next
        pass, or none."""
        wanted = []
        spare = self.max_pass_rows - num_running if self.max_pass_rows else self.max_model_len
        for req in reqs:
            if req.proposal_state is None:
                req.proposal_state = ProposalState(self.memory_for(req))
            k = min(self.room(req, req.proposal_state, num_running), spare)
            if k > 0:
                wanted.append((req, req.proposal_state, k))
                spare -= k
        if not wanted:
            return
        # fitted to blocks once the continuations are known: one may come back short or empty
        found = self.continuations(wanted)
        lengths = fit_blocks([len(tokens) for tokens in found],
                             [state.acceptance for _, state, _ in wanted], num_running,
                             self.row_block)
        for (req, _, _), tokens, k in zip(wanted, found, lengths):
            req.draft = Draft(tokens[:k], None, verify_each=True) if k else None

    def room(self, req: Request, state: ProposalState, num_running: int) -> int:
        """How many tokens the request may propose now: 0 for one that finished, has a
        grammar (it makes drafts of its own), waits in backoff, or runs in too large a batch.
        A proposal is cut so that every token of it can be used: the row after its last token
        samples one more, so that token must be allowed too (max_tokens, the context)."""
        if req.finish_reason is not None or req.constraint is not None or num_running > self.max_batch:
            return 0
        if state.wait:
            state.wait -= 1
            return 0
        room = self.max_model_len - req.num_tokens - 1
        max_tokens = req.sampling.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - len(req.output_token_ids) - 1)
        return max(0, min(proposal_length(state.acceptance, num_running, self.num_tokens), room))

    def memory_for(self, req: Request) -> Any:
        """What the proposer keeps of a request between its proposals (ProposalState.memory)."""
        return None

    def continuations(self, wanted: Wanted) -> list[list[int]]:
        """Up to k proposed tokens for each (request, its state, k); [] for none."""
        raise NotImplementedError

    def release(self, req: Request) -> None:
        """The request has left the engine (finished or aborted): free what it holds."""
