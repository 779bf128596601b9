"""Prompt lookup (engine/ngram.py): what it proposes, and where it stops."""

from __future__ import annotations

import random

import pytest

from pikaserve.config import EngineConfig
from pikaserve.engine.constraint import Draft
from pikaserve.engine.ngram import NgramIndex, NgramProposer
from pikaserve.engine.proposer import (
    MIN_ACCEPTANCE, ProposalState, fit_blocks, min_acceptance, proposal_length)
from pikaserve.engine.request import Request
from pikaserve.engine.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


def brute_force_continuation(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """NgramIndex.continuation by scanning the whole list, longest n first, latest first."""
    last = len(tokens) - 1
    for n in range(min(hi, last), lo - 1, -1):
        suffix = tokens[last + 1 - n :]
        for end in range(last - 1, n - 2, -1):
            if tokens[end + 1 - n : end + 1] == suffix:
                out: list[int] = []
                for src in range(end + 1, end + 1 + k):
                    out.append(tokens[src] if src <= last else out[src - last - 1])
                return out
    return []


@pytest.mark.parametrize("tokens,lo,hi,want", [
    ([1, 2, 3, 4, 1, 2, 3], 1, 3, [4, 1, 2]),
    ([1, 2, 9, 1, 2, 8, 1, 2], 2, 2, [8, 1, 2]),  # the latest occurrence
    ([5, 1, 2, 7, 3, 1, 2, 8, 5, 1, 2], 1, 3, [7, 3, 1]),  # the longest n first
    ([5, 1, 2, 7, 3, 1, 2, 8, 5, 1, 2], 1, 2, [8, 5, 1]),
    ([1, 2, 3], 1, 3, []),
    ([4, 4, 4], 1, 2, [4, 4, 4]),  # copies on from an occurrence that runs into the end
    ([7, 1, 2, 7, 1], 2, 2, [2, 7, 1]),
    ([7, 1, 2, 7, 1], 3, 3, []),
])
def test_continuation(tokens, lo, hi, want):
    assert NgramIndex(lo, hi).continuation(tokens, 3) == want


def test_the_index_grows_with_the_tokens():
    rng = random.Random(0)
    for _ in range(50):
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 4)
        index = NgramIndex(lo, hi)
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 5))]
        for _ in range(40):
            assert index.continuation(tokens, 4) == brute_force_continuation(tokens, lo, hi, 4)
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 3))]


def request(prompt: list[int], output: list[int], **params) -> Request:
    req = Request("r", prompt, SamplingParams(**params), None, frozenset())
    req.append_tokens(output)
    return req


def propose(proposer: NgramProposer, req: Request, num_running: int,
            acceptance: float = 1.0) -> Draft | None:
    """The request's proposal for its next pass, as the engine asks after a step; a request
    seen for the first time starts with this average acceptance (1: proposals of full length)."""
    if req.proposal_state is None:
        req.proposal_state = ProposalState(proposer.memory_for(req))
        req.proposal_state.acceptance = acceptance
    req.draft = None
    proposer.propose([req], num_running)
    return req.draft


def test_proposals_are_cut_to_max_tokens_and_the_context():
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 20)
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    draft = propose(proposer, request(prompt, [], max_tokens=None), 1)
    assert draft is not None and draft.token_ids == [4, 5, 6, 7] and draft.verify_each
    # the row after the last proposed token samples one more, so room is left for it
    assert propose(proposer, request(prompt, [], max_tokens=3), 1).token_ids == [4, 5]
    assert propose(proposer, request(prompt, [], max_tokens=1), 1) is None
    assert propose(proposer, request(prompt, [4] * 7, max_tokens=9), 1).token_ids == [4]
    assert propose(proposer, request(prompt, [4, 5, 6], max_tokens=None), 1).token_ids == [
        7, 1, 2, 3]
    assert propose(proposer, request(prompt, [4, 5, 6, 7, 1, 2, 3, 4], max_tokens=None), 1
                            ).token_ids == [5]  # the context ends after it
    assert propose(proposer, request(prompt, [4, 5, 6, 7, 1, 2, 3, 4, 5], max_tokens=None), 1) is None


def test_constrained_and_finished_requests_get_no_proposal():
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 100)
    req = request([1, 2, 1], [], max_tokens=None)
    req.constraint = object()  # any grammar: it makes drafts of its own
    assert propose(proposer, req, 1) is None
    req = request([1, 2, 1], [], max_tokens=None)
    req.finish_reason = "stop"
    assert propose(proposer, req, 1) is None


def test_no_proposals_past_disable_by_batch_size():
    proposer = NgramProposer(EngineConfig(speculative_config={**NGRAM, "disable_by_batch_size": 3}).speculative(), 100)
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert propose(proposer, request(prompt, [], max_tokens=None), 3) is not None
    assert propose(proposer, request(prompt, [], max_tokens=None), 4) is None


def test_poorly_accepted_proposals_back_off_and_good_ones_reset():
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 100)
    req = request([1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [], max_tokens=None)

    def steps_until_the_next_proposal() -> int:
        skipped = 0
        while propose(proposer, req, 1, MIN_ACCEPTANCE) is None:
            skipped += 1
        return skipped

    assert propose(proposer, req, 1, MIN_ACCEPTANCE) is not None
    req.proposal_state.checked(4, 4)  # average (MIN_ACCEPTANCE + 1) / 2 = 0.7
    assert steps_until_the_next_proposal() == 0
    waits = []
    for _ in range(7):
        req.proposal_state.checked(0, 4)  # the proposal just made: wholly rejected
        waits.append(steps_until_the_next_proposal())
    assert waits == [1, 4, 16, 64, 64, 64, 64]
    for _ in range(3):  # wholly accepted: the average is back above it (0.5, 0.75, 0.875)
        req.proposal_state.checked(4, 4)
    assert steps_until_the_next_proposal() == 0
    req.proposal_state.checked(0, 4)
    assert steps_until_the_next_proposal() == 0  # one miss after good ones does not wait yet
    req.proposal_state.checked(0, 4)
    assert steps_until_the_next_proposal() == 1  # the backoff starts over


def test_a_first_miss_backs_off_and_the_bar_rises_with_the_batch():
    assert min_acceptance(1) == min_acceptance(2) == MIN_ACCEPTANCE
    assert min_acceptance(4) == min_acceptance(8) == pytest.approx(0.55)
    state = ProposalState()
    state.checked(1, 4)  # (0.4 + 0.25) / 2 = 0.325: below the bar from the first proposal
    assert state.wait == 1
    state = ProposalState()
    state.checked(3, 4)  # 0.575
    assert state.wait == 0
    state.checked(2, 4, min_acceptance(8))  # 0.54 is enough alone, not with 8 running
    assert state.wait == 1


def test_proposal_length_follows_acceptance_and_the_batch():
    # token i comes true with ~acceptance**i; it is proposed while that pays for its row
    # (0.14 per running request, at most 0.55), and a probe of one token is always allowed
    assert proposal_length(1.0, 1, 4) == 4
    assert proposal_length(0.4, 1, 4) == 2  # 0.16 >= 0.14 > 0.064
    assert proposal_length(0.6, 2, 4) == 2  # 0.36 >= 0.28 > 0.216
    assert proposal_length(0.4, 4, 4) == 1  # 0.16 < 0.55
    assert proposal_length(0.9, 8, 4) == 4  # 0.9**4 = 0.66 >= 0.55
    assert proposal_length(0.85, 8, 4) == 3
    assert proposal_length(0.1, 16, 4) == 1
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 100)
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert propose(proposer, request(prompt, [], max_tokens=None), 1, 0.4).token_ids == [4, 5]
    assert propose(proposer, request(prompt, [], max_tokens=None), 4, 0.4).token_ids == [4]


def test_a_steps_proposals_keep_the_pass_within_its_rows():
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 100,
                             max_pass_rows=7)
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    reqs = [request(prompt, [], max_tokens=None) for _ in range(3)]
    for req in reqs:
        propose(proposer, req, 3)  # creates each state with acceptance 1 (full proposals)
        req.draft = None
    proposer.propose(reqs, 3)  # 3 running rows leave 4 for proposals, in order
    assert [r.draft.token_ids if r.draft else None for r in reqs] == [[4, 5, 6, 7], None, None]
    proposer.propose(reqs[1:], 5)  # 5 running leave 2
    assert reqs[1].draft.token_ids == [4, 5] and reqs[2].draft is None


def test_proposals_fill_whole_blocks_of_rows():
    """With a row block of 4 (torch's int4 kernel), a step's drafts fill the rows its running
    requests leave in their last block, and open a new block only when they fill it, keeping
    each request's likeliest tokens (its first ones, from the best-accepted requests)."""
    assert fit_blocks([4], [0.9], 1, 4) == [3]  # 1 + 3 rows: one block
    assert fit_blocks([4, 4], [0.9, 0.5], 2, 4) == [4, 2]  # 2 + 6 rows: two blocks
    assert fit_blocks([1, 1], [0.5, 0.6], 4, 4) == [0, 0]  # 2 rows would open a block of 4
    assert fit_blocks([2, 1, 1], [0.5, 0.9, 0.7], 4, 4) == [2, 1, 1]
    # 3 running leave 1 row; 5 of the 6 fill it and a block, without the first's third (0.5**3)
    assert fit_blocks([3, 3], [0.5, 0.9], 3, 4) == [2, 3]
    assert fit_blocks([3, 3], [0.5, 0.9], 3, 1) == [3, 3]  # no blocks: as proposed
    assert fit_blocks([0, 2], [1.0, 0.5], 2, 4) == [0, 2]


def test_blocks_are_fitted_to_what_the_lookup_found():
    """With 4 running rows a new block needs 4 draft tokens: a request that finds nothing to
    look up leaves its share to none, and the others' are cut to whole blocks."""
    proposer = NgramProposer(EngineConfig(speculative_config=NGRAM).speculative(), 100,
                             max_pass_rows=12, row_block=4)
    copying = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    reqs = [request(copying, [], max_tokens=None), request([9, 8, 7, 6], [], max_tokens=None),
            request(copying, [], max_tokens=None)]
    for req, acceptance in zip(reqs, (1.0, 1.0, 0.6)):
        req.proposal_state = ProposalState(proposer.memory_for(req))
        req.proposal_state.acceptance = acceptance
    proposer.propose(reqs, 4)  # asked for 4, 4 and 0 (8 spare rows); found 4, 0
    assert [r.draft.token_ids if r.draft else None for r in reqs] == [[4, 5, 6, 7], None, None]
    for req in reqs:
        req.draft = None
    reqs[1].proposal_state.acceptance = 0.6
    proposer.propose(reqs, 4)  # asked for 4, 1 and 1; found 4, 0 and 1: 5 cut to 4
    assert [r.draft.token_ids if r.draft else None for r in reqs] == [[4, 5, 6, 7], None, None]
