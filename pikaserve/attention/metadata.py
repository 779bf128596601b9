"""The torch backend's attention metadata: where each token's keys and values live.

Built from the step's BatchLayout (TorchBackend.metadata) and passed to the model explicitly.
Tokens are laid out flat, single-token (decode) rows first, then multi-token chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ChunkSequence:
    """A sequence computing several tokens this step (a prefill chunk or forced tokens)."""

    query_start: int  # first row of this sequence in the flat token batch
    query_len: int
    context_len: int  # tokens in the KV cache after this step, including the new ones
    block_table: torch.Tensor  # [num_blocks] int64, the sequence's KV blocks in order
    # [query_len, context_len] additive bias, 0 = attend, -inf = not (causal, shifted by the
    # cached tokens); None when nothing was cached before this chunk (plain causal attention)
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot each new token is written to
    num_decode_tokens: int  # leading rows that are single-token sequences
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_context_len: int  # the longest decode row's context (keys gathered per row)
    # [num_decodes, 1, 1, decode_context_len] bool, True = attend; None when every decode row
    # has the longest context (one row, or equal lengths): nothing to mask
    decode_mask: torch.Tensor | None
    chunks: list[ChunkSequence]
