"""The torch backend's batched query rows (decodes, drafts, short chunks in one matmul) against
the same sequences attended one SDPA call each."""

from __future__ import annotations

import pytest
import torch

from pikaserve.attention import torch_backend
from pikaserve.attention.torch_backend import TorchBackend
from test_triton_attention import make_step


def attend(seqs, monkeypatch, batched_rows: int, dtype=torch.float32):
    monkeypatch.setattr(torch_backend, "MAX_BATCHED_ROWS", batched_rows)
    torch.manual_seed(0)
    block_size, heads, kv_heads, dim = 4, 6, 2, 16
    num_blocks = sum(-(-c // block_size) for _, c in seqs) + 3
    layout = make_step(seqs, block_size, num_blocks)
    t = layout.num_tokens
    q, k, v = (torch.randn(t, h, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, dtype=dtype) for _ in range(2)]
    backend = TorchBackend()
    meta = backend.metadata(layout, torch.device("cpu"), dtype)
    return backend.layer(heads, kv_heads, dim).forward(q, k, v, *caches, meta), meta


@pytest.mark.parametrize("seqs", [
    [(1, 9), (1, 30), (1, 2)],  # ragged decodes
    [(5, 13)],  # one draft
    [(1, 6), (1, 30), (3, 11), (9, 9), (2, 40), (5, 5)],  # rows after a long chunk
    [(2, 3), (20, 50), (1, 7), (8, 8)],  # a fresh short prompt, a chunk between the rows
])
def test_rows_match_one_call_per_sequence(seqs, monkeypatch):
    want, _ = attend(seqs, monkeypatch, batched_rows=1)
    got, meta = attend(seqs, monkeypatch, batched_rows=8)
    assert meta.rows is not None and meta.rows.num_rows == sum(n for n, _ in seqs if n <= 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want, _ = attend(seqs, monkeypatch, batched_rows=1, dtype=torch.bfloat16)
    got, _ = attend(seqs, monkeypatch, batched_rows=8, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
