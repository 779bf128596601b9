"""Paged attention in plain PyTorch: runs on CPU and CUDA alike.

KV cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. New keys/values
are scattered to their slots first; attention then gathers each sequence's blocks. Sequences
of a few new tokens (decodes, drafts, forced chunks) are batched into one masked attention over
query rows, longer chunks (prefill) run one SDPA call each. With the compiled CPU kernels
(kernels/cpu_native.py) each kind is one kernel call that reads the blocks in place: about 2-3x
faster than SDPA for prefill chunks over a cached prefix (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pikaserve.attention.layout import BatchLayout
from pikaserve.attention.metadata import (
    AttentionMetadata, ChunkSequence, PagedChunks, PagedRows, RowBatch,
)
from pikaserve.kernels.cpu_native import CpuKernels

# Sequences computing at most this many tokens (decodes, drafts, forced chunks) are attended
# together as query rows; longer ones (prefill chunks) one SDPA call each, or all in one call
# of the compiled chunk kernel.
MAX_BATCHED_ROWS = 8


class TorchBackend:
    name = "torch"

    def __init__(self, native: CpuKernels | None = None) -> None:
        self.native = native  # the compiled CPU kernels, or None for PyTorch ops only

    @property
    def fused_kernels(self) -> CpuKernels | None:
        return self.native

    def layer(self, num_heads: int, num_kv_heads: int, head_dim: int) -> "TorchPagedAttention":
        return TorchPagedAttention(num_heads, num_kv_heads, head_dim, self.native)

    def metadata(
        self, layout: BatchLayout, device: torch.device, dtype: torch.dtype
    ) -> AttentionMetadata:
        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        short = layout.query_lens <= MAX_BATCHED_ROWS
        rows: RowBatch | PagedRows | None = None
        if short.any():
            make = _row_batch if self.native is None else _paged_rows
            rows = make(layout, np.flatnonzero(short), tensor)
        long = np.flatnonzero(~short)
        if self.native is not None:
            paged: PagedChunks | list[ChunkSequence] = (
                _paged_chunks(layout, long, tensor) if len(long) else [])
            return AttentionMetadata(tensor(layout.slot_mapping), rows, paged)
        chunks: list[ChunkSequence] = []
        for i in long:
            start, n, ctx = layout.query_starts[i], layout.query_lens[i], layout.context_lens[i]
            mask = None
            if ctx > n:  # row i sees the cached tokens and the chunk's first i + 1
                pos = np.arange(ctx - n, ctx)
                allowed = np.arange(ctx)[None, :] <= pos[:, None]
                # additive (0 / -inf) in the model dtype: SDPA's CPU kernel takes it ~5%
                # faster than a boolean mask it would convert in every layer
                bias = np.where(allowed, np.float32(0), np.float32("-inf"))
                mask = torch.from_numpy(bias).to(device, dtype)
            num_blocks = -(-int(ctx) // layout.block_size)
            table = tensor(layout.block_tables[i][:num_blocks])
            chunks.append(ChunkSequence(int(start), int(n), int(ctx), table, mask))
        return AttentionMetadata(tensor(layout.slot_mapping), rows, chunks)


def _paged_chunks(layout: BatchLayout, seqs: np.ndarray, tensor) -> PagedChunks:
    """The PagedChunks of the layout's sequences `seqs` (in order)."""
    return PagedChunks(
        block_tables=tensor(layout.padded_tables(seqs.tolist())),
        starts=tensor(layout.query_starts[seqs]),
        lens=tensor(layout.query_lens[seqs]),
        context_lens=tensor(layout.context_lens[seqs]),
    )


def _paged_rows(layout: BatchLayout, seqs: np.ndarray, tensor) -> PagedRows:
    """The PagedRows of the layout's sequences `seqs` (in order)."""
    n, ctx = layout.query_lens[seqs], layout.context_lens[seqs]
    first_row = np.repeat(np.cumsum(n) - n, n)
    offset = np.arange(int(n.sum())) - first_row  # a row's place within its sequence
    row_lens = np.repeat(ctx - n, n) + offset + 1
    return PagedRows(
        block_tables=tensor(layout.padded_tables(seqs.tolist())),
        row_tokens=tensor(np.repeat(layout.query_starts[seqs], n) + offset),
        row_seqs=tensor(np.repeat(np.arange(len(seqs)), n)),
        row_lens=tensor(row_lens),
        longest=int(row_lens.max()),
    )


def _row_batch(layout: BatchLayout, seqs: np.ndarray, tensor) -> RowBatch:
    """The RowBatch of the layout's sequences `seqs` (in order)."""
    n, ctx = layout.query_lens[seqs], layout.context_lens[seqs]
    m, longest = int(n.max()), int(ctx.max())
    slot = np.minimum(np.arange(m)[None, :], n[:, None] - 1)  # [S, m]: padding repeats the last
    tokens = (layout.query_starts[seqs][:, None] + slot).reshape(-1)
    visible = ctx[:, None] - n[:, None] + slot + 1  # [S, m]: the keys each slot attends to
    real = (np.arange(m)[None, :] < n[:, None]).reshape(-1)
    row_tokens = tokens[real]
    mask = None
    if (visible != longest).any():
        seen = np.arange(longest)[None, None, :] < visible[:, :, None]  # [S, m, L]
        mask = tensor(seen[:, None, :, None, :])
    return RowBatch(
        block_tables=tensor(layout.padded_tables(seqs.tolist())),
        context_len=longest,
        max_rows=m,
        slot_tokens=None if _leading(tokens) else tensor(tokens),
        kept_slots=None if real.all() else tensor(np.flatnonzero(real)),
        row_tokens=None if _leading(row_tokens) else tensor(row_tokens),
        mask=mask,
        num_rows=len(row_tokens),
    )


def _leading(tokens: np.ndarray) -> bool:
    """True when `tokens` are 0, 1, 2, ...: a slice of the batch, no gather needed."""
    return bool((tokens == np.arange(len(tokens))).all())


class TorchPagedAttention:
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, native: CpuKernels | None = None
    ) -> None:
        self.native = native
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.gqa = num_heads != num_kv_heads

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)

        rows, chunks = meta.rows, meta.chunks
        if isinstance(chunks, PagedChunks) or isinstance(rows, PagedRows):
            return self._native(q, k_cache, v_cache, meta)
        if isinstance(rows, RowBatch) and not chunks and rows.row_tokens is None:
            return self._rows(q, k_cache, v_cache, rows)  # every token, in order
        if rows is None and len(chunks) == 1:
            return self._chunk(q, k, v, k_cache, v_cache, chunks[0])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if rows is not None:
            got = self._rows(q, k_cache, v_cache, rows)
            if rows.row_tokens is None:
                out[: rows.num_rows] = got
            else:
                out.index_copy_(0, rows.row_tokens, got)
        for chunk in chunks:
            span = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            out[span] = self._chunk(q[span], k[span], v[span], k_cache, v_cache, chunk)
        return out

    def _native(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Attention by the compiled CPU kernels, which read the blocks in place and each write
        their own tokens' rows of the output."""
        if self.native is None:
            raise RuntimeError("PagedRows and PagedChunks need the compiled CPU kernels")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rows, chunks = meta.rows, meta.chunks
        if isinstance(rows, PagedRows):
            self.native.attention_rows(
                q, k_cache, v_cache, rows.block_tables, rows.row_tokens, rows.row_seqs,
                rows.row_lens, rows.longest, self.scale, out)
        if isinstance(chunks, PagedChunks):
            self.native.attention_chunks(
                q, k_cache, v_cache, chunks.block_tables, chunks.starts, chunks.lens,
                chunks.context_lens, self.scale, out)
        return out

    def _rows(self, q, k_cache, v_cache, rows: RowBatch) -> torch.Tensor:
        """Attention of every row of a RowBatch, [R, Hq, D]. Plain matmuls beat SDPA's CPU
        kernel ~5x for a few query rows, and one batched call beats one SDPA call per
        sequence (~240 us per sequence and layer); GQA by grouping the query heads per key
        head instead of repeating keys."""
        s, m, hkv, d = rows.block_tables.shape[0], rows.max_rows, self.num_kv_heads, self.head_dim
        slots = q[: s * m] if rows.slot_tokens is None else q.index_select(0, rows.slot_tokens)
        keys = self._gather(k_cache, rows.block_tables, rows.context_len)  # [S, Hkv, L, D]
        values = self._gather(v_cache, rows.block_tables, rows.context_len)
        # [S * m, Hq, D] -> [S, Hkv, m * group, D]: a sequence's rows share its keys
        queries = slots.view(s, m, hkv, -1, d).transpose(1, 2).reshape(s, hkv, -1, d)
        scores = (queries @ keys.mT).float().mul_(self.scale)  # [S, Hkv, m * group, L]
        if rows.mask is not None:
            scores.view(s, hkv, m, -1, rows.context_len).masked_fill_(~rows.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = (probs @ values).view(s, hkv, m, -1, d).transpose(1, 2).reshape(s * m, -1, d)
        return out if rows.kept_slots is None else out.index_select(0, rows.kept_slots)

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` cached rows of each table's sequence, as [B, Hkv, L, D].

        index_select is ~2x faster than advanced indexing here, and a contiguous head-major
        copy makes the following batched matmuls ~2x faster than strided views.
        """
        b = tables.shape[0]
        rows = cache.index_select(0, tables.flatten()).view(b, -1, self.num_kv_heads, self.head_dim)
        return rows[:, :length].transpose(1, 2).contiguous()

    def _chunk(self, q, k, v, k_cache, v_cache, chunk: ChunkSequence) -> torch.Tensor:
        q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
        if chunk.mask is None:  # nothing cached before this chunk: attend to the fresh keys
            keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        else:
            keys = self._gather(k_cache, chunk.block_table[None], chunk.context_len)
            values = self._gather(v_cache, chunk.block_table[None], chunk.context_len)
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=chunk.mask, is_causal=chunk.mask is None,
            scale=self.scale, enable_gqa=self.gqa,
        )
        return o[0].transpose(0, 1)
