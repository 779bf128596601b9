"""A draft model (vLLM's "draft_model" speculative method): a smaller model sharing the target's
tokenizer decodes each proposing request's next few tokens greedily, and the target's next pass
checks them (engine/drafts.py). Its proposals follow the text, not only repeats of it, so it
helps where prompt lookup cannot; each proposal costs k small passes of its own.

The draft keeps its own paged KV cache, as many blocks as the target's inside the same memory
budget (the engine sizes both), with its own block pool and prefix cache: a shared system prompt
is computed once by the draft too. A request's draft sequence (DraftSequence) catches up on the
tokens it has not seen (the prompt, in chunks under max_num_batched_tokens, then what each step
appended) in one batched pass for all proposing requests, then feeds its own guesses, one pass
per further token. Guessed tokens' KV counts only once the request's tokens turn out to match
them; only blocks of the request's own tokens reach the draft's prefix cache. A request the
draft pool has no blocks for proposes nothing that step: the draft never preempts anyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pikaserve.attention.layout import LayoutBuilder
from pikaserve.config import ConfigError, EngineConfig, SpeculativeConfig
from pikaserve.engine.forward_inputs import ForwardInputs
from pikaserve.engine.model_runner import ModelRunner
from pikaserve.engine.proposer import Proposer, Wanted
from pikaserve.engine.request import Request
from pikaserve.kv.block_pool import BlockPool, extend_hashes
from pikaserve.kv.kv_cache import allocate_kv_cache
from pikaserve.model.loader import LoadedModel


def check_draft_model(draft: LoadedModel, target: LoadedModel) -> None:
    """ConfigError unless the draft's token ids mean what the target's do."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"speculative_config: the draft model {draft.path.name} has a vocabulary of "
            f"{draft.config.vocab_size} tokens, the target {target.config.vocab_size}; a draft "
            "model must share the target's tokenizer")
    if draft.tokenizer.hf.get_vocab() != target.tokenizer.hf.get_vocab():
        raise ConfigError(
            f"speculative_config: the draft model {draft.path.name}'s tokenizer differs from "
            "the target's (same size, other tokens); a draft model must share the target's "
            "tokenizer")


@dataclass(slots=True)
class DraftSequence:
    """A request as the draft model has seen it."""

    block_ids: list[int] = field(default_factory=list)  # in the draft's block pool
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0  # the request's leading tokens whose draft KV is in the cache
    num_published: int = 0  # leading blocks offered to the draft's prefix cache
    # the last proposal's tokens whose KV was written, after the num_computed known ones
    guessed: list[int] = field(default_factory=list)
    started: bool = False  # the prefix cache was looked up


class DraftModelProposer(Proposer):
    def __init__(
        self,
        config: SpeculativeConfig,
        draft: LoadedModel,
        num_blocks: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        engine: EngineConfig,
        max_model_len: int,
        max_pass_rows: int = 0,
        row_block: int = 1,
    ) -> None:
        """`num_blocks`: as many as the target's cache has (the engine sized both)."""
        super().__init__(config, max_model_len, max_pass_rows, row_block)
        bs = self.block_size = engine.block_size
        kv_caches = allocate_kv_cache(draft.config, num_blocks, bs, device, kv_dtype)
        self.pool = BlockPool(num_blocks, bs, engine.enable_prefix_caching)
        self.runner = ModelRunner(draft.model, kv_caches, bs, device, draft.backend)
        self.max_num_batched_tokens = engine.max_num_batched_tokens
        self.num_passes = 0  # draft passes run, and their rows (tokens computed)
        self.num_rows = 0

    def memory_for(self, req: Request) -> DraftSequence:
        return DraftSequence()

    def release(self, req: Request) -> None:
        if req.proposal_state is not None:
            seq: DraftSequence = req.proposal_state.memory
            self.pool.free(seq.block_ids)
            seq.block_ids, seq.num_computed, seq.num_published = [], 0, 0

    def continuations(self, wanted: Wanted) -> list[list[int]]:
        budget = self.max_num_batched_tokens
        chunks: list[tuple[Request, DraftSequence, int, int]] = []  # (req, seq, k, new tokens)
        for req, state, k in wanted:
            seq: DraftSequence = state.memory
            if not seq.started:
                self._reuse_prefix(req, seq)
            self._roll_back(req, seq)
            n = min(req.num_tokens - seq.num_computed, budget)
            if n < 1:
                continue
            whole = seq.num_computed + n == req.num_tokens
            # a whole catch-up proposes too: its guesses but the last are fed back
            end = req.num_tokens + k - 1 if whole else seq.num_computed + n
            if self.pool.grow(seq.block_ids, end):
                chunks.append((req, seq, k if whole else 0, n))
                budget -= n
        if not chunks:
            return [[] for _ in wanted]
        chunks.sort(key=lambda c: c[3] != 1)  # single-token rows first, as a layout wants
        builder, ids, rows = LayoutBuilder(self.block_size), [], []
        for req, seq, _, n in chunks:
            ids += req.all_token_ids[seq.num_computed : seq.num_computed + n]
            builder.add(seq.block_ids, seq.num_computed, n)
            rows.append(len(ids) - 1)
            seq.num_computed += n
            self._publish(req, seq)
        firsts = self._greedy(ids, builder, rows)
        guesses = {req.request_id: [t] for (req, _, k, _), t in zip(chunks, firsts) if k}
        going = [(req, seq, k) for req, seq, k, _ in chunks if k]
        for j in range(1, max((k for _, _, k in going), default=0)):
            going = [g for g in going if g[2] > j]
            builder, ids = LayoutBuilder(self.block_size), []
            for req, seq, _ in going:
                ids.append(guesses[req.request_id][-1])
                builder.add(seq.block_ids, req.num_tokens + j - 1, 1)
            for (req, _, _), t in zip(going, self._greedy(ids, builder, range(len(ids)))):
                guesses[req.request_id].append(t)
        for req, seq, k, _ in chunks:
            if k:
                seq.guessed = guesses[req.request_id][:-1]
        return [guesses.get(req.request_id, []) for req, _, _ in wanted]

    def _greedy(self, ids: list[int], builder: LayoutBuilder, rows) -> list[int]:
        """One draft pass; the most likely next token at each of `rows`."""
        step = ForwardInputs(np.asarray(ids, dtype=np.int64), builder.build(),
                             np.asarray(rows, dtype=np.int64), None, None, (), None)
        logits, _ = self.runner.forward(step)
        self.num_passes += 1
        self.num_rows += len(ids)
        return logits.argmax(dim=-1).tolist()

    def _roll_back(self, req: Request, seq: DraftSequence) -> None:
        """Keeps the KV of the last proposal's tokens the request went on with, drops the rest
        (the next passes overwrite their slots)."""
        if not seq.guessed:
            return
        kept = req.all_token_ids[seq.num_computed : seq.num_computed + len(seq.guessed)]
        m = 0
        while m < len(kept) and kept[m] == seq.guessed[m]:
            m += 1
        seq.num_computed += m
        seq.guessed = []

    def _reuse_prefix(self, req: Request, seq: DraftSequence) -> None:
        seq.started = True
        max_blocks = (req.num_tokens - 1) // self.block_size
        extend_hashes(seq.block_hashes, req.all_token_ids, max_blocks, self.block_size,
                      req.sampling.cache_salt)
        seq.block_ids = self.pool.match_prefix(seq.block_hashes[:max_blocks])
        seq.num_published = len(seq.block_ids)
        seq.num_computed = seq.num_published * self.block_size
        self.pool.record_lookup(req.num_tokens, seq.num_computed)

    def _publish(self, req: Request, seq: DraftSequence) -> None:
        """Offers the blocks that the request's own tokens filled to the prefix cache."""
        num_full = seq.num_computed // self.block_size
        extend_hashes(seq.block_hashes, req.all_token_ids, num_full, self.block_size,
                      req.sampling.cache_salt)
        for b in range(seq.num_published, num_full):
            self.pool.cache_block(seq.block_ids[b], seq.block_hashes[b])
        seq.num_published = max(seq.num_published, num_full)
