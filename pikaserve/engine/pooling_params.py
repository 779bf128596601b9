"""Settings of a prefill-only request: hidden states of a span of its prompt, no sampling.

A classification head or an embedding is such a request: its prompt joins the continuous batch
like any prefill (prefix cache and chunking apply), and when its last prompt token has been
computed the engine hands back the span's hidden states (or what a transform makes of them)
instead of sampling a token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pikaserve.errors import InvalidRequestError


@dataclass(slots=True)
class SpanStates:
    """A finished pooling request's hidden states."""

    states: torch.Tensor  # [T, len(layers), hidden] float32: the span's positions, in order
    split: int  # span_split relative to the span: rows [0, split) come before it


# SpanStates of finishing requests -> one result per request (see PoolingParams.transform)
PoolTransform = Callable[[list[SpanStates]], list[Any]]


@dataclass(frozen=True, slots=True)
class PoolingParams:
    # Hidden-state layers to return, in this order: 0 = the embeddings, i = the output of
    # decoder layer i (the residual stream, before the final norm).
    layers: tuple[int, ...]
    # Applied on the engine thread to the SpanStates of all finishing requests that share it
    # (one call per step), one result per request out, which comes back as
    # RequestOutput.pooled. None: the SpanStates come back.
    transform: PoolTransform | None = None
    # The states of prompt positions span_start .. end come back (T rows); None: the last
    # prompt token's only (T = 1). The prefix cache is reused only up to span_start, since
    # the span's states must be computed.
    span_start: int | None = None
    # A prompt position inside the span that the transform pools on each side of (e.g. where
    # a marker ends); it gets it relative to the span. None: the span's start.
    span_split: int | None = None
    cache_salt: str | None = None  # as SamplingParams.cache_salt

    def check(self, num_layers: int, num_tokens: int) -> None:
        if not self.layers:
            raise InvalidRequestError("a pooling request needs at least one layer", "layers")
        if any(not isinstance(i, int) or not 0 <= i <= num_layers for i in self.layers):
            raise InvalidRequestError(f"layers must be in [0, {num_layers}]", "layers")
        if self.span_start is not None and not 0 <= self.span_start < num_tokens:
            raise InvalidRequestError(f"span_start must be in [0, {num_tokens})", "span_start")
        first = self.first_pooled(num_tokens)
        if self.span_split is not None and not first <= self.span_split <= num_tokens:
            raise InvalidRequestError(f"span_split must be in [{first}, {num_tokens}]",
                                      "span_split")

    def first_pooled(self, num_tokens: int) -> int:
        """The first prompt position whose states are returned."""
        return num_tokens - 1 if self.span_start is None else self.span_start

    def span_states(self, states: torch.Tensor, num_tokens: int) -> SpanStates:
        first = self.first_pooled(num_tokens)
        split = 0 if self.span_split is None else self.span_split - first
        return SpanStates(states, split)
