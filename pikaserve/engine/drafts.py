"""Drafts: tokens a pass computes after a request's known ones, on a guess, then checks.

Two proposers make them. A grammar, where it leaves a few choices, guesses the next token and
adds every token it forces after it (engine/constraint.py); speculative decoding proposes the
tokens that followed the last earlier occurrence of the request's last few (engine/ngram.py).
The scheduler fits a draft into the request's next pass, after its known tokens. The runner
returns the logits at the request's last known token (sampled as usual) and after each draft
token that needs them (Draft.verify_each: all of a proposal's, only the last of a grammar
draft's, as the ones between are forced), and says which row is which (StepLogits).

The engine then checks each draft round by round (DraftCheck): the tokens the request just
appended (the sample, and what its grammar forced after it) are compared with the draft's next
ones; the KV of those that match is confirmed, and when the pass computed the logits after
them the request samples again, in the same step. Sampling first and comparing after, with the
request's own parameters and generator, is exact rejection sampling for a proposal made without
looking at the logits: each token still comes from the model's distribution given the tokens
before it, so greedy output is token for token the output without drafts. Unconfirmed draft KV
slots are scratch that the next pass overwrites; they never reach the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pikaserve.engine.constraint import Draft
from pikaserve.engine.request import Request


@dataclass(slots=True)
class DraftRows:
    """A request's draft in a pass, and which rows of the pass's logits follow its tokens."""

    draft: Draft
    rows: list[int]  # rows[j]: the logits after draft token first_verified + j

    def row_after(self, i: int) -> int | None:
        """The row of the logits after the draft's token i, when the pass computed them."""
        j = i - self.draft.first_verified
        return self.rows[j] if 0 <= j < len(self.rows) else None


@dataclass(slots=True)
class StepLogits:
    """A pass's logits and what each row belongs to."""

    logits: torch.Tensor  # float32 [rows, vocab]
    sampling: list[Request]  # row i: the last known token of sampling[i]
    drafts: dict[str, DraftRows]  # request id -> its draft and the rows after its tokens

    @property
    def sampled_logits(self) -> torch.Tensor:
        return self.logits[: len(self.sampling)]


@dataclass(slots=True)
class DraftCheck:
    """A request's draft, checked against the tokens the request appends, round by round."""

    request: Request
    rows: DraftRows
    start: int  # where the tokens appended in the latest round begin in all_token_ids
    matched: int = 0  # draft tokens the request's tokens matched so far

    def match(self) -> int:
        """How many of the tokens appended in the latest round match the draft's next ones
        (added to `matched`)."""
        new = self.request.all_token_ids[self.start :]
        ahead = self.rows.draft.token_ids[self.matched :]
        m = 0
        while m < len(new) and m < len(ahead) and new[m] == ahead[m]:
            m += 1
        self.matched += m
        return m


@dataclass(slots=True)
class SpecDecodeCounters:
    """vLLM's speculative-decoding counters. They count proposals only, not grammar drafts:
    a grammar draft's tokens after its guess are forced, and counting them as accepted would
    say nothing about the proposer."""

    num_drafts: int = 0  # proposals computed in a pass
    num_draft_tokens: int = 0  # their tokens
    num_accepted_tokens: int = 0  # of which the request sampled the same
    # [i]: proposals whose token i was accepted; one entry per position a proposal may have
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, check: DraftCheck) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += len(check.rows.draft.token_ids)
        self.num_accepted_tokens += check.matched
        for i in range(check.matched):
            self.accepted_per_pos[i] += 1


def propose_grammar_draft(req: Request, max_model_len: int) -> None:
    """Gives a running constrained request a grammar draft for its next pass, when its grammar
    has one worth computing and it stays inside the context."""
    if req.finish_reason is not None or req.constraint is None or req.constraint.is_finished:
        return
    draft = req.constraint.draft()
    if draft is not None and req.num_tokens + len(draft.token_ids) < max_model_len:
        req.draft = draft
