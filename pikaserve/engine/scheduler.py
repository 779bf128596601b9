"""Continuous batching under a token budget, with chunked prefill, prefix reuse and preemption.

Each step the scheduler walks the running requests in arrival order (so decodes, which need one
token each, are never starved by a long prompt), then admits waiting requests into what is left
of the token budget. A request's progress is just `num_computed_tokens` against its token list,
so prompt chunks, decode steps, recomputation after preemption and tokens forced by a grammar are
all the same thing: "compute the next N tokens". When KV blocks run out, the most recently
admitted running request is preempted and later recomputed (its full blocks usually survive in
the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pikaserve.engine.constraint import Draft
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.request import Request
from pikaserve.kv.block_pool import BlockPool, extend_hashes


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # including the draft's
    draft: Draft | None = None  # the request's draft, computed after its known tokens

    @property
    def num_draft(self) -> int:
        return len(self.draft.token_ids) if self.draft is not None else 0

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's known tokens."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens - self.num_draft == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # single-token rows first
    num_preempted: int = 0
    # Run only this many decoder layers (None: all): a step of pooling requests that read no
    # layer above it. Their KV of the layers above is never written, so what such a step
    # computes is never published to the prefix cache.
    depth: int | None = None
    # Fixed when scheduled (`samples` changes once the step is recorded as computed): the
    # generating requests that reach their last known token, so sample, this step, and the
    # pooling requests whose prompt is complete after it; both in `scheduled`'s order.
    sampling: list[Request] = field(default_factory=list)
    pooling: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        num_layers: int,
    ) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # total, for metrics and tests

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)

    # --- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # never one scheduled already: those come first
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
        # Drafts get what the known tokens of every running request left, so that a draft
        # never takes the blocks a later request needs; none when memory is tight.
        for s in scheduled:
            k = self._fit_draft(s.request, s.num_new_tokens, budget, bool(out.num_preempted))
            if k:
                s.draft, s.num_new_tokens = s.request.draft, s.num_new_tokens + k
                budget -= k

        # Admit new work only when nothing had to be preempted: memory is tight otherwise.
        while (
            self.waiting
            and budget > 0
            and not out.num_preempted
            and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            if not req.block_ids:
                self._reuse_prefix(req)
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and not self.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                self._release(req)  # don't sit on cached blocks while waiting
                break
            self.waiting.popleft()
            self.running.append(req)
            scheduled.append(ScheduledRequest(req, n))
            budget -= n

        out.scheduled = ([s for s in scheduled if s.num_new_tokens == 1]
                         + [s for s in scheduled if s.num_new_tokens != 1])
        for s in out.scheduled:
            if s.samples:
                (out.pooling if s.request.is_pooling else out.sampling).append(s.request)
        out.depth = self._shallow_depth(out.scheduled)
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the scheduled known tokens were computed. Draft tokens count only once
        the engine confirms them (`confirm_draft`); until then their KV slots are scratch that
        the next pass overwrites."""
        for s in out.scheduled:
            if out.depth is not None and s.request.publish_limit is None:
                s.request.publish_limit = s.request.num_computed_tokens
            self._computed(s.request, s.num_new_tokens - s.num_draft)

    def confirm_draft(self, req: Request, num_tokens: int) -> None:
        """The last `num_tokens` tokens appended were the draft the last pass computed."""
        self._computed(req, num_tokens)

    # --- helpers ------------------------------------------------------------------------
    def _computed(self, req: Request, n: int) -> None:
        """n more tokens have their KV in the cache; blocks that became full are published."""
        req.num_computed_tokens += n
        publishable = req.num_computed_tokens
        if req.publish_limit is not None:
            publishable = min(publishable, req.publish_limit)
        num_full = publishable // self.block_size
        self._extend_hashes(req, num_full)
        for b in range(req.num_published_blocks, num_full):
            self.pool.cache_block(req.block_ids[b], req.block_hashes[b])
        req.num_published_blocks = max(req.num_published_blocks, num_full)

    def _shallow_depth(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The layers a step needs when it holds only pooling requests that read none of the
        top layers and compute nothing before their span's block (a shared prefix, such as a
        system prompt, is computed at full depth and so cached); None: all layers."""
        depth = 0
        for s in scheduled:
            r, p = s.request, s.request.params
            if not isinstance(p, PoolingParams):
                return None
            span_block = p.first_pooled(r.num_tokens) // self.block_size
            if r.num_computed_tokens < span_block * self.block_size:
                return None
            depth = max(depth, *p.layers)
        return depth if depth < self.num_layers else None

    def _fit_draft(self, req: Request, n: int, budget: int, tight: bool) -> int:
        """The request's draft tokens to compute this step: all of them after all of its known
        tokens, in budget and in free blocks, or none (a draft never preempts anyone)."""
        k = req.num_draft_tokens
        remaining = req.num_tokens - req.num_computed_tokens
        if k and (
            tight
            or n < remaining
            or n + k > budget
            or not self._grow(req, req.num_computed_tokens + n + k)
        ):
            req.draft, k = None, 0
        return k

    def _grow(self, req: Request, num_tokens: int) -> bool:
        return self.pool.grow(req.block_ids, num_tokens)

    def _reuse_prefix(self, req: Request) -> None:
        max_blocks = req.num_reusable_tokens // self.block_size
        self._extend_hashes(req, max_blocks)
        cached = self.pool.match_prefix(req.block_hashes[:max_blocks])
        req.block_ids = cached
        req.num_published_blocks = len(cached)
        req.num_computed_tokens = len(cached) * self.block_size
        if req.num_cached_tokens < 0:  # count the first admission only, not recomputes
            req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            self.pool.record_lookup(req.num_prompt_tokens, req.num_cached_tokens)

    def _extend_hashes(self, req: Request, num_blocks: int) -> None:
        extend_hashes(req.block_hashes, req.all_token_ids, num_blocks, self.block_size,
                      req.params.cache_salt)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.draft = None
        req.pooled_states = []  # recomputed with the rest
        req.publish_limit = None
        req.num_computed_tokens = 0
        req.num_published_blocks = 0
