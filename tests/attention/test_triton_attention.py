"""The Triton paged-attention kernel against the torch backend on the same caches and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pikaserve.attention.layout import BatchLayout
from pikaserve.attention.torch_backend import TorchBackend

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_step(seqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int = 0):
    """seqs: (query_len, context_len) each, decodes first. Blocks are dealt out shuffled so
    every sequence's pages are scattered through the cache."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(num_blocks))
    tables, slots, positions = [], [], []
    for query_len, context_len in seqs:
        table = np.array([free.pop() for _ in range(-(-context_len // block_size))], dtype=np.int64)
        pos = np.arange(context_len - query_len, context_len)
        tables.append(table)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        positions.append(pos)
    return BatchLayout(
        query_lens=np.array([q for q, _ in seqs], dtype=np.int64),
        context_lens=np.array([c for _, c in seqs], dtype=np.int64),
        block_tables=tables,
        slot_mapping=np.concatenate(slots),
        positions=np.concatenate(positions),
        block_size=block_size,
    )


def run_both(seqs, heads=4, kv_heads=2, dim=16, block_size=4, dtype=torch.float32, seed=0,
             kv_dtype=None, splits=None):
    """The triton layer's output and caches against the torch backend's. `splits` forces the
    number of programs sharing a query block's keys (default: the backend's choice)."""
    from pikaserve.attention.triton_backend import TritonBackend

    torch.manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for _, c in seqs) + 3
    layout = make_step(seqs, block_size, num_blocks, seed)
    t = layout.num_tokens
    q = torch.randn(t, heads, dim, dtype=dtype, device=DEVICE)
    k = torch.randn(t, kv_heads, dim, dtype=dtype, device=DEVICE)
    v = torch.randn(t, kv_heads, dim, dtype=dtype, device=DEVICE)
    shape = (num_blocks, block_size, kv_heads, dim)
    # the cached prefixes: random keys and values already in every page
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    if kv_dtype is not None:  # what an fp8 cache holds, seen in the model dtype by the reference
        k_cache, v_cache = k_cache.to(kv_dtype).to(dtype), v_cache.to(kv_dtype).to(dtype)
        k, v = k.to(kv_dtype).to(dtype), v.to(kv_dtype).to(dtype)
    ref_caches = (k_cache.clone(), v_cache.clone())
    torch_backend = TorchBackend()
    want = torch_backend.layer(heads, kv_heads, dim).forward(
        q, k, v, *ref_caches, torch_backend.metadata(layout, DEVICE, dtype))
    triton_backend = TritonBackend(heads, kv_heads)
    caches = (k_cache.to(kv_dtype or dtype), v_cache.to(kv_dtype or dtype))
    meta = triton_backend.metadata(layout, DEVICE, dtype)
    if splits is not None:
        meta.num_splits = splits
    got = triton_backend.layer(heads, kv_heads, dim).forward(q, k, v, *caches, meta)
    return got, want, caches, ref_caches


@pytest.mark.parametrize("seqs", [
    [(1, 9)],  # one decode row
    [(1, 5), (1, 17), (1, 2)],  # ragged decodes
    [(7, 7)],  # a fresh prefill chunk
    [(5, 13)],  # a chunk over a cached prefix
    [(1, 6), (1, 30), (3, 11), (9, 9), (2, 40)],  # decodes, drafts and chunks in one launch
])
def test_matches_torch_backend(seqs):
    got, want, caches, ref = run_both(seqs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[0], ref[0])  # new keys and values written alike
    torch.testing.assert_close(caches[1], ref[1])


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_keys_split_over_programs(splits):
    """Flash-decoding: each query block's keys shared by several programs, then merged; a
    split may get no key at all (short contexts)."""
    got, want, _, _ = run_both([(1, 300), (1, 5), (4, 200), (9, 9)], splits=splits)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3), (8, 1)])
def test_gqa_groups(heads, kv_heads):
    got, want, _, _ = run_both([(1, 10), (4, 12), (6, 6)], heads=heads, kv_heads=kv_heads)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 2, 16, 32])
def test_block_sizes(block_size):
    got, want, _, _ = run_both([(1, 37), (5, 21), (3, 3)], block_size=block_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    got, want, _, _ = run_both([(1, 19), (6, 14)], dim=64, dtype=dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_fp8_cache_reads_what_it_stored():
    """An e4m3 cache: the kernel converts on read; the reference sees the same rounded values."""
    got, want, caches, _ = run_both(
        [(1, 11), (4, 9)], dtype=torch.bfloat16, kv_dtype=torch.float8_e4m3fn)
    assert caches[0].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_head_dim_not_a_power_of_two():
    got, want, _, _ = run_both([(1, 8), (3, 10)], dim=24)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padded_arrays_give_the_same_rows():
    """A step padded to a graph bucket: padding rows write nowhere, real rows are unchanged."""
    from pikaserve.attention.triton_backend import (
        PaddedShape, TritonBackend, batch_arrays, max_query_blocks)

    heads, kv_heads, dim, block_size = 4, 2, 16, 4
    layout = make_step([(1, 9), (3, 7)], block_size, 8)
    backend = TritonBackend(heads, kv_heads)
    pad = PaddedShape(num_tokens=8, num_seqs=8)
    arrays = batch_arrays(layout, backend.block_q, pad)
    assert arrays.slot_mapping.shape == (8,) and (arrays.slot_mapping[4:] == -1).all()
    assert arrays.block_tables.shape == (2, 3) and arrays.query_lens.shape == (8,)
    assert len(arrays.qblock_seq) == max_query_blocks(8, 8, backend.block_q)
    torch.manual_seed(0)
    q = torch.randn(8, heads, dim, device=DEVICE)
    k, v = torch.randn(2, 8, kv_heads, dim, device=DEVICE)
    caches = torch.randn(2, 8, block_size, kv_heads, dim, device=DEVICE)
    plain_caches = caches.clone()
    layer = backend.layer(heads, kv_heads, dim)
    meta = backend.to_device(arrays, DEVICE)
    wide = torch.full((8, 6), 7, dtype=torch.int64, device=DEVICE)  # a graph's table buffer:
    wide[:2, :3] = meta.block_tables  # the step fills its own rows and columns; the rest is stale
    meta.block_tables = wide
    padded = layer.forward(q, k, v, caches[0], caches[1], meta)
    plain = layer.forward(q[:4], k[:4], v[:4], plain_caches[0], plain_caches[1],
                          backend.metadata(layout, DEVICE, torch.float32))
    torch.testing.assert_close(padded[:4], plain)
    torch.testing.assert_close(caches, plain_caches)
