"""A request's life inside the engine: its tokens, KV blocks, progress and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pikaserve.engine.constraint import Constraint, Draft
    from pikaserve.engine.detokenizer import IncrementalDetokenizer
    from pikaserve.engine.proposer import ProposalState


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams  # PoolingParams: prefill only, no token sampled
    detokenizer: "IncrementalDetokenizer"
    eos_token_ids: frozenset[int]
    constraint: Constraint | None = None  # a structured-output matcher
    draft: Draft | None = None  # guessed tokens the next pass computes after the known ones
    proposal_state: ProposalState | None = None  # speculative proposals: backoff, proposer memory
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    publish_limit: int | None = None  # tokens past this were computed shallow: never published
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (set on first admit)
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    pooled_states: list[torch.Tensor] = field(default_factory=list)  # pooling: rows so far
    # timings (time.perf_counter)
    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        params = self.params
        if isinstance(params, SamplingParams) and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_pooling(self) -> bool:
        return isinstance(self.params, PoolingParams)

    @property
    def sampling(self) -> SamplingParams:
        """The params of a generating request; a pooling request has none (it never samples)."""
        if isinstance(self.params, SamplingParams):
            return self.params
        raise TypeError(f"request {self.request_id} is a pooling request: it samples nothing")

    @property
    def pooling(self) -> PoolingParams:
        """The params of a pooling request; a generating request has none."""
        if isinstance(self.params, PoolingParams):
            return self.params
        raise TypeError(f"request {self.request_id} is a generating request: it pools nothing")

    @property
    def num_reusable_tokens(self) -> int:
        """Leading tokens whose KV may come from the prefix cache: all but the last (a step
        must compute something), and none of a pooling span (its states are needed)."""
        if isinstance(self.params, PoolingParams):
            return self.params.first_pooled(self.num_tokens)
        return self.num_tokens - 1

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft.token_ids) if self.draft is not None else 0

    def append_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
