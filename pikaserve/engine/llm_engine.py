"""The synchronous engine: add requests, call `step()` until done, read the outputs.

One step = schedule -> one model forward -> sample -> update requests. Everything that talks
HTTP or asyncio lives above this class (see async_engine.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pikaserve.config import ConfigError, EngineConfig
from pikaserve.engine.constraint import Constraint, Draft
from pikaserve.engine.drafts import DraftCheck, SpecDecodeCounters, StepLogits, propose_grammar_draft
from pikaserve.engine.detokenizer import IncrementalDetokenizer
from pikaserve.kv.kv_cache import allocate_kv_cache, bytes_per_token, num_kv_blocks
from pikaserve.engine.model_runner import ModelRunner
from pikaserve.engine.draft_model import DraftModelProposer, check_draft_model
from pikaserve.engine.ngram import NgramProposer
from pikaserve.engine.proposer import Proposer, min_acceptance
from pikaserve.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from pikaserve.engine.pooling_params import PoolingParams, PoolTransform
from pikaserve.engine.request import Request
from pikaserve.engine.sampler import Sampler
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.scheduler import Scheduler
from pikaserve.errors import InvalidRequestError
from pikaserve.kv.block_pool import BlockPool
from pikaserve.kv.host_tier import HostKVTier
from pikaserve.model.loader import LoadedModel, load_model, resolve_model_path
from pikaserve.engine.device import (
    configure_threads, describe_cpu, resolve_device, resolve_dtype, resolve_int8_rows,
    resolve_kv_cache_dtype, resolve_q4_int8)

logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        start = time.perf_counter()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        configure_threads(config, self.device)
        path = resolve_model_path(config.model)
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.device) or self.dtype
        int8_rows = resolve_int8_rows(config, self.device, self.dtype)
        q4_int8 = resolve_q4_int8(config, self.device, self.dtype)

        def load(path: Path, max_positions: int | None) -> LoadedModel:
            return load_model(path, self.device, self.dtype, max_positions, config.int4_max_rows,
                              int8_rows, config.attention_backend, kv_dtype, config.cpu_kernels,
                              q4_int8)

        loaded = load(path, config.max_model_len)
        self.model_path = path
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = config.max_model_len or min(
            loaded.config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN
        )
        speculative = config.speculative()
        draft = None
        if speculative is not None and speculative.method == "draft_model":
            draft = load(resolve_model_path(speculative.model), self.max_model_len)
            check_draft_model(draft, loaded)
        # A draft model's cache has as many blocks as the target's, in the same budget.
        token_bytes = sum(bytes_per_token(m.config, kv_dtype) for m in (loaded, draft) if m)
        num_blocks = num_kv_blocks(token_bytes, config, self.device, self.max_model_len)
        kv_caches = allocate_kv_cache(loaded.config, num_blocks, config.block_size, self.device,
                                      kv_dtype)
        if num_blocks * config.block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than "
                f"max_model_len={self.max_model_len}: raise the KV memory budget or lower "
                "max_model_len"
            )
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({config.max_num_batched_tokens} < {self.max_model_len})"
            )
        tier = _offloading_tier(config, kv_caches)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching, tier)
        self.scheduler = Scheduler(
            self.pool,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            loaded.config.num_layers,
        )
        graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from pikaserve.engine.cuda_graphs import CudaGraphs, graph_sizes

            graphs = CudaGraphs.capture(
                loaded.model, kv_caches, loaded.backend,
                graph_sizes(config.max_cudagraph_capture_size, config.max_num_batched_tokens),
                -(-self.max_model_len // config.block_size), self.device,
            )
        self.runner = ModelRunner(
            loaded.model, kv_caches, config.block_size, self.device, loaded.backend, graphs
        )
        self.sampler = Sampler(loaded.config.vocab_size, config.seed, self.device)
        self.proposer: Proposer | None = None
        # proposals keep a pass on the 4-bit kernels, in full blocks of their rows
        pass_rows, row_block = loaded.model.int4_rows(), loaded.model.row_block()
        if speculative is not None and draft is not None:
            self.proposer = DraftModelProposer(speculative, draft, num_blocks, kv_dtype,
                                               self.device, config, self.max_model_len,
                                               pass_rows, row_block)
        elif speculative is not None:
            self.proposer = NgramProposer(speculative, self.max_model_len, pass_rows, row_block)
        self.spec_counters = SpecDecodeCounters(
            accepted_per_pos=[0] * (speculative.num_speculative_tokens if speculative else 0))
        self.requests: dict[str, Request] = {}
        self._ready: list[RequestOutput] = []  # requests a grammar finished without a pass
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "loaded %s (%s, %s, %s attention) in %.2fs; KV cache %d blocks x %d tokens (%s)%s",
            path.name, self.device, str(self.dtype).removeprefix("torch."),
            loaded.backend.name, self.load_seconds, num_blocks, config.block_size,
            str(kv_dtype).removeprefix("torch."),
            f"; draft model {draft.path.name} with a cache of its own" if draft else "",
        )
        if tier is not None:
            logger.info("prefix cache second tier: %d blocks in %s host memory (%.2f GiB)",
                        tier.num_blocks, "pinned" if tier.pinned else "plain",
                        tier.num_blocks * HostKVTier.block_bytes(kv_caches) / 2**30)
        if self.device.type == "cpu":
            model = loaded.model
            logger.info(describe_cpu(self.dtype, model.int4_rows(), model.int8_rows(),
                                     model.q4_int8_layers(), model.q8_int8_head(),
                                     model.q4_int8_vnni(), model.q4_int8_rows(),
                                     loaded.backend.fused_kernels is not None,
                                     model.decode_kernel is not None))

    # --- requests -----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | PoolingParams,
        constraint: Constraint | None = None,
    ) -> Request:
        """Queues a request. With PoolingParams it is prefill-only: when its prompt has been
        computed it finishes with its span's hidden states, or its transform's result
        (RequestOutput.pooled)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(token_ids, params)
        if isinstance(params, PoolingParams):
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, [], False)
            req = Request(request_id, token_ids, params, detok, frozenset())
            self.requests[request_id] = req
            self.scheduler.add(req)
            return req
        if constraint is None:
            constraint = self.constraint_for(params)
        eos = frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        detok = IncrementalDetokenizer(
            self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output
        )
        req = Request(request_id, token_ids, params, detok, eos, constraint)
        self.requests[request_id] = req
        if constraint is not None and self.config.structured_output_fast_forward:
            # Tokens the grammar forces before anything is sampled join the first prefill.
            forced = constraint.forced_tokens()
            constraint.accept(forced)
            req.append_tokens(self._check_stops(req, forced))
            if req.finish_reason is not None:  # the whole answer was forced: no pass at all
                req.first_token_time = time.perf_counter()
                del self.requests[request_id]
                self._ready.append(self._output(req, req.output_token_ids, [], finished=True))
                return req
        self.scheduler.add(req)
        return req

    def constraint_for(self, params: SamplingParams | PoolingParams) -> Constraint | None:
        """The request's structured-output matcher (compiled grammars are cached), or None;
        InvalidRequestError for a bad schema or grammar. Callers that must not wait (an event
        loop) use structured.constraint_off_loop, which compiles on the grammar threads."""
        if not isinstance(params, SamplingParams) or params.structured_outputs is None:
            return None
        from pikaserve.structured import build_constraint

        return build_constraint(params.structured_outputs, self.tokenizer)

    def check_request(
        self, token_ids: list[int], params: SamplingParams | PoolingParams
    ) -> None:
        """Raises InvalidRequestError for a request that can never run; touches no state."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        n = len(token_ids)
        if isinstance(params, PoolingParams):
            params.check(self.model_config.num_layers, n)
            if n > self.max_model_len:
                raise InvalidRequestError(
                    f"the input has {n} tokens; this model's maximum context length is "
                    f"{self.max_model_len}", "input")
            return
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's maximum context length is "
                f"{self.max_model_len} and at least one token must be generated",
                "prompt",
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds the "
                f"maximum context length {self.max_model_len}",
                "max_tokens",
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.abort(req)
        if self.proposer is not None:
            self.proposer.release(req)
        req.finish_reason = "abort"
        return self._output(req, [], [], finished=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._ready)

    # --- stepping -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        ready, self._ready = self._ready, []
        out = self.scheduler.schedule()
        if not out.scheduled:
            return ready
        now = time.perf_counter()
        for s in out.scheduled:
            if s.request.scheduled_time is None:
                s.request.scheduled_time = now
        drafts = [s.draft for s in out.scheduled if s.draft is not None]
        vocab_rows = self._allowed_vocab(out.sampling, drafts)
        step, pooled = self.runner.execute(out, vocab_rows)
        self.scheduler.advance(out)
        if pooled is not None:
            pooled.keep()
        if out.pooling:
            ready += self._finish_pooling(out.pooling)
        if not step.sampling:
            return ready
        result = self.sampler(step.sampled_logits, step.sampling)
        outputs = {}
        checks = []  # the drafts this pass computed, checked against what their requests append
        for req, token, lp in zip(step.sampling, result.token_ids, result.logprobs):
            req.draft = None
            start = req.num_tokens
            outputs[req.request_id] = self._update(req, token, lp)
            rows = step.drafts.get(req.request_id)
            if rows is not None:
                checks.append(DraftCheck(req, rows, start))
        if checks:
            self._check_drafts(step, checks, outputs)
        self._propose(step.sampling)
        return ready + list(outputs.values())

    def _check_drafts(
        self, step: StepLogits, checks: list[DraftCheck], outputs: dict[str, RequestOutput]
    ) -> None:
        """Round after round, every request whose draft came true so far samples once more,
        from the row after the tokens it matched (one sampler call per round for all), until
        a token differs, its draft ends (the last row gives one token more) or it finishes."""
        going = checks
        while True:
            nexts = [(c, row) for c in going if (row := self._next_row(c)) is not None]
            if not nexts:
                break
            going = [c for c, _ in nexts]
            result = self.sampler(step.logits[[row for _, row in nexts]],
                                  [c.request for c in going])
            for c, token, lp in zip(going, result.token_ids, result.logprobs):
                req = c.request
                c.start = req.num_tokens
                outputs[req.request_id] = _joined(outputs[req.request_id],
                                                  self._update(req, token, lp))
        for c in checks:
            if c.rows.draft.verify_each:
                self.spec_counters.record(c)
                if (state := c.request.proposal_state) is not None:
                    state.checked(c.matched, len(c.rows.draft.token_ids),
                                  min_acceptance(len(self.scheduler.running)))

    def _next_row(self, check: DraftCheck) -> int | None:
        """Confirms the KV of the draft tokens that the request's latest ones matched; returns
        the row of the logits of its next token when the pass computed them, else None."""
        req = check.request
        num_new = req.num_tokens - check.start
        matched = check.match()
        if req.finish_reason is not None:  # finished: its blocks are freed already
            return None
        if matched:
            self.scheduler.confirm_draft(req, matched)
        if matched < num_new:  # a token differed, or the draft ended before it
            return None
        return check.rows.row_after(check.matched - 1)

    def _propose(self, reqs: list[Request]) -> None:
        """Drafts for the requests' next passes: their grammars', or speculative proposals."""
        free = []
        for req in reqs:
            if req.finish_reason is not None:
                continue
            if req.constraint is None:
                free.append(req)
            elif self.config.structured_output_draft and self.config.structured_output_fast_forward:
                propose_grammar_draft(req, self.max_model_len)
        if free and self.proposer is not None:
            self.proposer.propose(free, len(self.scheduler.running))

    def _finish_pooling(self, reqs: list[Request]) -> list[RequestOutput]:
        """Finishes pooling requests whose prompt is now computed. Each gets its states, or
        its transform's result: one transform call per distinct transform per step."""
        params = [r.pooling for r in reqs]
        groups: dict[PoolTransform | None, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.transform, []).append(i)
        states = [p.span_states(torch.cat(r.pooled_states), r.num_tokens)
                  for r, p in zip(reqs, params)]
        pooled: list = [None] * len(reqs)
        for transform, rows in groups.items():
            mine = [states[i] for i in rows]
            for i, result in zip(rows, mine if transform is None else transform(mine)):
                pooled[i] = result
        now = time.perf_counter()
        outputs = []
        for req, result in zip(reqs, pooled):
            req.first_token_time = now
            req.finish_reason = "stop"
            self.scheduler.finish(req)
            del self.requests[req.request_id]
            out = self._output(req, [], [], finished=True)
            out.pooled = result
            outputs.append(out)
        return outputs

    def _allowed_vocab(self, sampling: list[Request], drafts: list[Draft]) -> list[int] | None:
        """The tokens any sampling row may take, when every one is held by its grammar to a
        few: the LM head then computes only their logits (the full head is ~5 ms of a CPU
        pass; the sampler sees the same masked logits either way)."""
        allowed: set[int] = set()
        rows_allowed = (r.constraint.allowed_tokens() if r.constraint is not None else None
                        for r in sampling)
        for ids in itertools.chain(rows_allowed, (d.allowed_after for d in drafts)):
            if ids is None:
                return None
            allowed.update(ids)
        vocab = self.model_config.vocab_size
        rows = sorted(t for t in allowed if t < vocab)
        return rows if 0 < len(rows) <= vocab // 4 else None

    def _update(self, req: Request, token: int, logprob) -> RequestOutput:
        forced_first: list[int] = []
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
            forced_first = list(req.output_token_ids)  # forced at add_request, not yet reported
        tokens = [token] + self._constrain(req, token)
        kept = self._check_stops(req, tokens)
        req.append_tokens(kept)
        kept = forced_first + kept
        logprobs = [TokenLogprob(token, logprob[0], logprob[1])] if logprob else []
        finished = req.finish_reason is not None
        if finished:
            self.scheduler.finish(req)
            if self.proposer is not None:
                self.proposer.release(req)
            del self.requests[req.request_id]
        return self._output(req, kept, logprobs, finished)

    def _constrain(self, req: Request, token: int) -> list[int]:
        """Advance the request's grammar; returns the tokens it forces next (fast-forward)."""
        c = req.constraint
        if c is None or token in req.eos_token_ids:
            return []
        c.accept([token])
        if c.is_finished or not self.config.structured_output_fast_forward:
            return []
        forced = c.forced_tokens()
        if forced:
            c.accept(forced)
        return forced

    def _check_stops(self, req: Request, tokens: list[int]) -> list[int]:
        """Tokens to append, cut at the first that ends the request (sets finish_reason)."""
        p = req.sampling
        for n, t in enumerate(tokens, 1):
            if t in req.eos_token_ids or t in p.stop_token_ids:
                req.finish_reason = "stop"
                req.stop_reason = None if t in req.eos_token_ids else t
                return tokens[:n]
            hit = req.detokenizer.add_tokens([t])
            if hit is not None:
                req.finish_reason, req.stop_reason = "stop", hit
                return tokens[:n]
            num_out = len(req.output_token_ids) + n
            if (p.max_tokens is not None and num_out >= p.max_tokens) or (
                req.num_tokens + n >= self.max_model_len
            ):
                req.finish_reason = "length"
                return tokens[:n]
        if req.constraint is not None and req.constraint.is_finished:
            req.finish_reason = "stop"  # the answer is complete: no pass for end-of-sequence
        return tokens

    def _output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob], finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_text=req.detokenizer.take_delta(finished),
            finished=finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=len(req.output_token_ids),
            logprobs=logprobs,
            arrival_time=req.arrival_time,
            scheduled_time=req.scheduled_time,
            first_token_time=req.first_token_time,
            finished_time=time.perf_counter() if finished else None,
        )

    # --- introspection ------------------------------------------------------------------
    @property
    def num_forward_passes(self) -> int:
        return self.runner.num_forward_passes

    def stats(self) -> EngineStats:
        """Safe to call from another thread: each value is one read of a counter or len() of
        a container the loop thread owns (atomic under the GIL), so a snapshot may be one step
        stale, never torn."""
        tier = self.pool.tier
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.pool.usage,
            prefix_cache_queries=self.pool.queries,
            prefix_cache_hits=self.pool.hits,
            kv_offload_blocks=tier.num_used_blocks if tier else 0,
            kv_offload_stored=tier.offloaded if tier else 0,
            kv_offload_restored=tier.restored if tier else 0,
            num_forward_passes=self.runner.num_forward_passes,
            spec_decode_num_drafts=self.spec_counters.num_drafts,
            spec_decode_num_draft_tokens=self.spec_counters.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.spec_counters.num_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=tuple(self.spec_counters.accepted_per_pos),
        )

    def pool_is_idle(self) -> bool:
        """True when every KV block is free or merely cached (no request holds one)."""
        return self.pool.num_free_blocks == self.pool.num_blocks


def _offloading_tier(config: EngineConfig,
                     kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> HostKVTier | None:
    """The prefix cache's second tier, as many blocks as kv_offloading_size GiB hold."""
    if not config.kv_offloading_size:
        return None
    num_blocks = int(config.kv_offloading_size * 2**30) // HostKVTier.block_bytes(kv_caches)
    if num_blocks < 1:
        raise ConfigError(f"kv_offloading_size={config.kv_offloading_size} GiB holds no KV block "
                          f"({HostKVTier.block_bytes(kv_caches)} bytes each)")
    return HostKVTier(kv_caches, num_blocks)


def _joined(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output for two updates of a request in the same step (a draft that came true)."""
    then.new_token_ids = first.new_token_ids + then.new_token_ids
    then.new_text = first.new_text + then.new_text
    then.logprobs = first.logprobs + then.logprobs
    return then
