"""Paged attention in Triton, for CUDA: one launch per layer for the whole step.

Decode rows, prefill chunks over a cached prefix, and grammar drafts are all the same thing
here: a sequence with `query_len` new tokens at the end of `context_len` cached ones. The host
cuts every sequence's queries into blocks of BLOCK_Q tokens and lists them (`qblock_seq`,
`qblock_first`); each program takes one such block for one KV head, so the grid grows with the
step's tokens, never with the longest sequence, and no Python loop runs per sequence.

GQA: a program holds the BLOCK_Q tokens x all query heads of its KV head as the rows of one
tile, so every key tile is read once per group. Keys and values are read straight from their
pages through the block table, with an online softmax (FlashAttention's running max and sum)
in float32. An fp8 cache is read and converted on the fly (scale 1, like vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from pikaserve.attention.layout import BatchLayout

MIN_DOT = 16  # tl.dot needs at least 16 rows, columns and depth
MAX_SPLITS = 8
TARGET_PROGRAMS = 128  # about the number of cores (SMs) of an H100/H200


@dataclass(slots=True)
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64; -1 = a padding row, written nowhere
    block_tables: torch.Tensor  # [S, W] int64
    context_lens: torch.Tensor  # [S] int64
    query_starts: torch.Tensor  # [S] int64
    query_lens: torch.Tensor  # [S] int64
    qblock_seq: torch.Tensor  # [NQB] int64: the sequence of each query block; -1 = none
    qblock_first: torch.Tensor  # [NQB] int64: its first token within the sequence's queries
    block_q: int  # tokens per query block
    num_splits: int  # programs sharing one query block's keys (flash-decoding); 1 = none


@dataclass(slots=True)
class TritonBatchArrays:
    """The metadata's arrays on the host (all int64), optionally padded to fixed sizes."""

    slot_mapping: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    query_starts: np.ndarray
    query_lens: np.ndarray
    qblock_seq: np.ndarray
    qblock_first: np.ndarray


def query_block_size(num_heads: int, num_kv_heads: int) -> int:
    """Tokens per query block: enough that tokens x padded group fill a 16-row dot."""
    return max(1, MIN_DOT // triton.next_power_of_2(num_heads // num_kv_heads))


@dataclass(frozen=True, slots=True)
class PaddedShape:
    """Fixed array sizes for a step (a CUDA-graph bucket): any step within them fits. Block
    tables are not padded: a graph reads them from a buffer as wide as the longest possible
    table, of which a step fills only its own rows and columns."""

    num_tokens: int
    num_seqs: int


def batch_arrays(
    layout: BatchLayout, block_q: int, pad: PaddedShape | None = None
) -> TritonBatchArrays:
    """The step's arrays; with `pad`, padded to its sizes: rows beyond the step write nowhere,
    sequences beyond it have no queries, query blocks beyond it have no sequence. The block
    tables are [S, the step's longest table] either way."""
    s = len(layout.query_lens)
    blocks_per_seq = -(-layout.query_lens // block_q)
    seq = np.repeat(np.arange(s, dtype=np.int64), blocks_per_seq)
    seq_first_block = np.repeat(np.cumsum(blocks_per_seq) - blocks_per_seq, blocks_per_seq)
    first = (np.arange(len(seq)) - seq_first_block) * block_q
    if pad is None:
        pad = PaddedShape(layout.num_tokens, s)
        num_qblocks = len(seq)
    else:
        num_qblocks = max_query_blocks(pad.num_tokens, pad.num_seqs, block_q)
    slots = np.full(pad.num_tokens, -1, dtype=np.int64)
    slots[: layout.num_tokens] = layout.slot_mapping
    tables = layout.padded_tables()
    lens = np.zeros((3, pad.num_seqs), dtype=np.int64)
    lens[0, :s] = layout.context_lens
    lens[1, :s] = layout.query_starts
    lens[2, :s] = layout.query_lens
    qblock_seq = np.full(num_qblocks, -1, dtype=np.int64)
    qblock_first = np.zeros(num_qblocks, dtype=np.int64)
    qblock_seq[: len(seq)] = seq
    qblock_first[: len(seq)] = first
    return TritonBatchArrays(slots, tables, lens[0], lens[1], lens[2], qblock_seq, qblock_first)


def max_query_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """An upper bound on query blocks for any step of so many tokens and sequences: each
    sequence's last block may be partial."""
    return num_tokens // block_q + num_seqs


def split_count(num_qblocks: int, num_kv_heads: int) -> int:
    """How many programs share each query block's keys. A step of a few sequences has a few
    programs per layer (one per query block and KV head) on a GPU with 100+ cores; splitting
    the keys over up to 8 programs, whose partial softmaxes a second kernel merges, puts the
    idle cores to work (flash-decoding). It pays from batch 1 at Pika's ~350-token contexts."""
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // max(1, num_qblocks * num_kv_heads)))


class TritonBackend:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        from pikaserve.kernels import fused

        self.fused_kernels = fused
        self.block_q = query_block_size(num_heads, num_kv_heads)
        self.num_kv_heads = num_kv_heads

    def layer(self, num_heads: int, num_kv_heads: int, head_dim: int) -> "TritonPagedAttention":
        return TritonPagedAttention(num_heads, num_kv_heads, head_dim)

    def metadata(
        self, layout: BatchLayout, device: torch.device, dtype: torch.dtype
    ) -> TritonAttentionMetadata:
        return self.to_device(batch_arrays(layout, self.block_q), device)

    def to_device(self, a: TritonBatchArrays, device: torch.device) -> TritonAttentionMetadata:
        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(device, non_blocking=True)

        return TritonAttentionMetadata(
            tensor(a.slot_mapping), tensor(a.block_tables), tensor(a.context_lens),
            tensor(a.query_starts), tensor(a.query_lens), tensor(a.qblock_seq),
            tensor(a.qblock_first), self.block_q,
            split_count(len(a.qblock_seq), self.num_kv_heads),
        )


class TritonPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TritonAttentionMetadata,
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        num_qblocks = meta.qblock_seq.shape[0]
        if num_qblocks == 0 or q.shape[0] == 0:
            return out
        group_pad = triton.next_power_of_2(self.group)
        head_pad = max(triton.next_power_of_2(self.head_dim), MIN_DOT)
        rows = meta.block_q * group_pad
        splits = meta.num_splits
        # per (query block, KV head, split): unnormalised output, running max and sum
        partial = q.new_empty((num_qblocks, self.num_kv_heads, splits, rows, head_pad),
                              dtype=torch.float32) if splits > 1 else out
        stats = q.new_empty((2, num_qblocks, self.num_kv_heads, splits, rows),
                            dtype=torch.float32) if splits > 1 else out
        shape = dict(GROUP=self.group, GROUP_PAD=group_pad, BLOCK_Q=meta.block_q,
                     HEAD_DIM=self.head_dim, HEAD_PAD=head_pad, NUM_SPLITS=splits)
        _paged_attention[(num_qblocks, self.num_kv_heads, splits)](
            q, k_cache, v_cache, out, partial, stats,
            meta.block_tables, meta.context_lens, meta.query_starts, meta.query_lens,
            meta.qblock_seq, meta.qblock_first,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            meta.block_tables.stride(0), self.scale,
            PAGE=k_cache.shape[1], BLOCK_N=64, IEEE=q.dtype == torch.float32,
            num_warps=4, **shape,
        )
        if splits > 1:
            _merge_splits[(num_qblocks, self.num_kv_heads)](
                out, partial, stats, meta.query_starts, meta.query_lens,
                meta.qblock_seq, meta.qblock_first, out.stride(0), out.stride(1),
                num_warps=4, **shape,
            )
        return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes each row's keys and values to its slot (converting to the cache dtype); rows
    with slot -1 are padding and write nothing."""
    t, heads, dim = k.shape
    if t == 0:
        return
    _store_kv[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads),
        HEAD_DIM=dim, HEAD_PAD=triton.next_power_of_2(dim),
    )


@triton.jit
def _store_kv(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_ch,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HEAD_PAD)[None, :]
        ok = (h < HEADS) & (d < HEAD_DIM)
        dst = slot * stride_slot + h * stride_ch + d
        key = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
        tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=ok)
        value = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
        tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _query_rows(
    qblock, kv_head, qblock_seq_ptr, qblock_first_ptr, query_starts_ptr, query_lens_ptr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """A query block's rows: BLOCK_Q tokens x GROUP_PAD query heads of one KV head. Returns
    (sequence, first token, query length, flat row of each row, head of each row, valid)."""
    seq = tl.load(qblock_seq_ptr + qblock)
    first = tl.load(qblock_first_ptr + qblock)
    query_len = tl.load(query_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = first + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    valid = (token < query_len) & (rows % GROUP_PAD < GROUP)
    flat = (tl.load(query_starts_ptr + seq) + token).to(tl.int64)
    return seq, first, query_len, token, flat, head, valid


@triton.jit
def _paged_attention(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, stats_ptr,
    tables_ptr, context_lens_ptr, query_starts_ptr, query_lens_ptr,
    qblock_seq_ptr, qblock_first_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_table, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if tl.load(qblock_seq_ptr + qblock) >= 0:
        seq, first, query_len, token, q_rows, head, row_ok = _query_rows(
            qblock, kv_head, qblock_seq_ptr, qblock_first_ptr, query_starts_ptr,
            query_lens_ptr, GROUP, GROUP_PAD, BLOCK_Q)
        context_len = tl.load(context_lens_ptr + seq)
        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_DIM
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        # a query token sees every key up to its own position (causal over the cached prefix)
        last_key = context_len - query_len + token
        num_keys = context_len - query_len + tl.minimum(first + BLOCK_Q, query_len)
        # this program's share of the keys, in whole tiles
        per_split = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(num_keys, lo + per_split)

        running_max = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            key = start + tl.arange(0, BLOCK_N)
            key_ok = key < hi
            page = tl.load(tables_ptr + seq * stride_table + key // PAGE, mask=key_ok, other=0)
            offset = page.to(tl.int64) * stride_cb + (key % PAGE) * stride_cs + kv_head * stride_ch
            kv_mask = key_ok[:, None] & d_ok[None, :]
            keys = tl.load(k_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
            keys = keys.to(q.dtype)
            if IEEE:
                scores = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(keys))
            seen = (key[None, :] <= last_key[:, None]) & key_ok[None, :]
            scores = tl.where(seen, scores * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # a row that has seen no key yet keeps -inf; shift by 0 so exp gives 0, not NaN
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp(scores - shift[:, None])
            rescale = tl.exp(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            values = tl.load(v_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
            values = values.to(q.dtype)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(probs.to(q.dtype), values, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(probs.to(q.dtype), values)
            running_max = new_max

        if NUM_SPLITS == 1:
            out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
            )
        else:  # leave the partial softmax for _merge_splits
            rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
            part = ((qblock * tl.num_programs(1) + kv_head) * NUM_SPLITS + split).to(tl.int64)
            tl.store(partial_ptr + (part * BLOCK_Q * GROUP_PAD + rows[:, None]) * HEAD_PAD
                     + d[None, :], acc)
            num_parts = tl.num_programs(0) * tl.num_programs(1) * NUM_SPLITS
            tl.store(stats_ptr + part * BLOCK_Q * GROUP_PAD + rows, running_max)
            tl.store(stats_ptr + (num_parts + part) * BLOCK_Q * GROUP_PAD + rows, running_sum)


@triton.jit
def _merge_splits(
    out_ptr, partial_ptr, stats_ptr, query_starts_ptr, query_lens_ptr,
    qblock_seq_ptr, qblock_first_ptr, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Merges a query block's partial softmaxes (the online-softmax update, once per split)."""
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tl.load(qblock_seq_ptr + qblock) >= 0:
        seq, first, query_len, token, q_rows, head, row_ok = _query_rows(
            qblock, kv_head, qblock_seq_ptr, qblock_first_ptr, query_starts_ptr,
            query_lens_ptr, GROUP, GROUP_PAD, BLOCK_Q)
        rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
        d = tl.arange(0, HEAD_PAD)
        num_parts = tl.num_programs(0) * tl.num_programs(1) * NUM_SPLITS
        total_max = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        total_sum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], tl.float32)
        for split in tl.static_range(NUM_SPLITS):
            part = ((qblock * tl.num_programs(1) + kv_head) * NUM_SPLITS + split).to(tl.int64)
            part_max = tl.load(stats_ptr + part * BLOCK_Q * GROUP_PAD + rows)
            part_sum = tl.load(stats_ptr + (num_parts + part) * BLOCK_Q * GROUP_PAD + rows)
            part_acc = tl.load(partial_ptr + (part * BLOCK_Q * GROUP_PAD + rows[:, None])
                               * HEAD_PAD + d[None, :])
            new_max = tl.maximum(total_max, part_max)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            old_scale = tl.exp(total_max - shift)
            part_scale = tl.exp(part_max - shift)
            total_sum = total_sum * old_scale + part_sum * part_scale
            acc = acc * old_scale[:, None] + part_acc * part_scale[:, None]
            total_max = new_max
        out = acc / tl.where(total_sum == 0.0, 1.0, total_sum)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :],
        )
