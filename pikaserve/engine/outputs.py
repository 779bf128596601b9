"""What the engine hands back: after each step, per request; and on demand, its counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob) alternatives, best first


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # a pooling request's answer: its SpanStates, or what its transform made of them
    pooled: Any = None
    # seconds, from time.perf_counter(), for latency metrics
    arrival_time: float = 0.0
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters, for metrics and health checks."""

    num_running: int  # requests in the running batch
    num_waiting: int  # requests waiting to be scheduled
    kv_usage: float  # fraction of KV blocks held by requests (1 = full)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found (in the KV cache or its second tier)
    num_forward_passes: int
    # the prefix cache's second tier (kv_offloading_size)
    kv_offload_blocks: int = 0  # blocks it holds
    kv_offload_stored: int = 0  # blocks copied into it (total)
    kv_offload_restored: int = 0  # blocks copied back on a prefix hit (total)
    # speculative decoding (vLLM's meaning; proposals only, not grammar drafts)
    spec_decode_num_drafts: int = 0  # proposals checked in a pass
    spec_decode_num_draft_tokens: int = 0  # their tokens
    spec_decode_num_accepted_tokens: int = 0  # of which the request sampled the same
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()  # [i]: those at position i
