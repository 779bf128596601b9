"""The torch backend's attention metadata: where each token's keys and values live.

Built from the step's BatchLayout (TorchBackend.metadata) and passed to the model explicitly.
Sequences computing a few tokens (decodes, drafts, short forced chunks) are attended together
as query rows (RowBatch in PyTorch, PagedRows with the compiled CPU kernels); longer chunks
(prefill) one SDPA call each (ChunkSequence), or all in one kernel call (PagedChunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ChunkSequence:
    """A sequence computing many tokens this step (a prefill chunk)."""

    query_start: int  # first row of this sequence in the flat token batch
    query_len: int
    context_len: int  # tokens in the KV cache after this step, including the new ones
    block_table: torch.Tensor  # [num_blocks] int64, the sequence's KV blocks in order
    # [query_len, context_len] additive bias, 0 = attend, -inf = not (causal, shifted by the
    # cached tokens); None when nothing was cached before this chunk (plain causal attention)
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class RowBatch:
    """S sequences of at most `max_rows` new tokens each, attended in one batched matmul: each
    new token is a query row that sees its sequence's keys up to its own position. A sequence
    has max_rows slots; slots past its new tokens repeat its last one and are dropped after."""

    block_tables: torch.Tensor  # [S, max_blocks] int64
    context_len: int  # the longest sequence's keys (gathered for every sequence)
    max_rows: int
    # [S * max_rows] int64: the token each slot reads; None when the slots are the leading
    # S * max_rows tokens in order
    slot_tokens: torch.Tensor | None
    kept_slots: torch.Tensor | None  # [R] int64: the slots that are real rows; None: all are
    # [R] int64: the token each real row is; None when they are the leading R tokens in order
    row_tokens: torch.Tensor | None
    # [S, 1, max_rows, 1, context_len] bool, True = attend; None when every slot sees all
    # context_len keys (nothing to mask)
    mask: torch.Tensor | None
    num_rows: int  # R


@dataclass(slots=True)
class PagedRows:
    """The same sequences as a RowBatch, for the CPU kernel (kernels/cpu_native.py), which
    reads keys through the block tables itself: one entry per new token (query row)."""

    block_tables: torch.Tensor  # [S, max_blocks] int64
    row_tokens: torch.Tensor  # [R] int64: the row's token in the flat batch
    row_seqs: torch.Tensor  # [R] int64: its sequence (row of block_tables)
    row_lens: torch.Tensor  # [R] int64: the keys it sees (its own position + 1)
    longest: int  # max(row_lens)


@dataclass(slots=True)
class PagedChunks:
    """Prefill chunks for the CPU kernel (kernels/cpu_native.py), attended in one call that
    reads keys through the block tables itself: chunk c's token i sees the first
    context_lens[c] - lens[c] + i + 1 keys of its sequence."""

    block_tables: torch.Tensor  # [C, max_blocks] int64
    starts: torch.Tensor  # [C] int64: the chunk's first token in the flat batch
    lens: torch.Tensor  # [C] int64: its new tokens
    context_lens: torch.Tensor  # [C] int64: its sequence's tokens after this step


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot each new token is written to
    rows: RowBatch | PagedRows | None  # the sequences of few tokens, or None when there are none
    chunks: list[ChunkSequence] | PagedChunks  # the others (PagedChunks with the CPU kernels)
