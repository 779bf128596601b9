"""The scheduler computes a request's draft after its known tokens, or not at all."""

from pikaserve.engine.constraint import Draft
from pikaserve.engine.request import Request
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.scheduler import Scheduler
from pikaserve.kv.block_pool import BlockPool


def running(scheduler: Scheduler, *num_prompt: int) -> list[Request]:
    """Requests whose prompts were computed together and whose first tokens were sampled."""
    reqs = [Request(f"r{i}", list(range(1, n + 1)), SamplingParams(), None, frozenset())
            for i, n in enumerate(num_prompt)]
    for req in reqs:
        scheduler.add(req)
    scheduler.advance(scheduler.schedule())
    for req in reqs:
        req.append_tokens([99])
    return reqs


def test_a_draft_runs_after_the_known_tokens_and_counts_only_once_confirmed():
    scheduler = Scheduler(BlockPool(8, 4, True), 8, 64, True, 2)
    (req,) = running(scheduler, 6)
    req.draft = Draft([7, 8, 9], None)
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert (s.num_new_tokens, s.num_draft, s.samples) == (4, 3, True)
    assert len(req.block_ids) == 3  # room for 10 tokens
    scheduler.advance(out)
    assert req.num_computed_tokens == 7 and req.num_published_blocks == 1
    req.append_tokens([7, 8, 9])
    scheduler.confirm_draft(req, 3)
    assert req.num_computed_tokens == 10 and req.num_published_blocks == 2


def test_a_draft_that_does_not_fit_is_dropped():
    scheduler = Scheduler(BlockPool(8, 4, True), 8, 3, True, 2)  # a 3-token step budget
    (req,) = running(scheduler, 3)
    req.draft = Draft([7, 8, 9], None)
    (s,) = scheduler.schedule().scheduled
    assert (s.num_new_tokens, s.num_draft, req.draft) == (1, 0, None)


def test_a_draft_never_preempts_another_request():
    scheduler = Scheduler(BlockPool(4, 4, True), 8, 64, True, 2)
    a, b = running(scheduler, 6, 2)  # 2 blocks and 1; one left
    a.draft = Draft([7, 8, 9, 10, 11, 12], None)  # would need 2 more
    out = scheduler.schedule()
    assert [(s.request, s.num_new_tokens, s.num_draft) for s in out.scheduled] == [
        (a, 1, 0), (b, 1, 0)]
    assert out.num_preempted == 0 and a.draft is None


def test_a_draft_never_takes_the_block_a_later_request_needs():
    scheduler = Scheduler(BlockPool(4, 4, True), 8, 64, True, 2)
    a, b = running(scheduler, 7, 4)  # 8 tokens in 2 blocks; 5 tokens: b needs a 2nd block
    a.draft = Draft([7], None)  # would take the last free block
    out = scheduler.schedule()
    assert [(s.request, s.num_new_tokens, s.num_draft) for s in out.scheduled] == [
        (a, 1, 0), (b, 1, 0)]
    assert out.num_preempted == 0 and a.draft is None


def test_drafts_get_the_budget_left_by_every_known_token():
    scheduler = Scheduler(BlockPool(16, 4, True), 8, 4, True, 2)  # a 4-token step budget
    a, b = running(scheduler, 2, 2)
    a.draft = Draft([7, 8, 9], None, verify_each=True)  # would leave b without budget
    b.draft = Draft([7], None, verify_each=True)
    out = scheduler.schedule()
    assert [(s.request, s.num_new_tokens, s.num_draft) for s in out.scheduled] == [
        (a, 1, 0), (b, 2, 1)]
    assert a.draft is None
