"""Every kernel launch the engine makes compiles for an A100 and an H100/H200, checked here on
a CPU: the launches are recorded under the interpreter and compiled by Triton's CUDA backend
(tests/kernels/gpu_compile.py). The GPU check then only has to run what already compiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .gpu_compile import compile_for_gpus, record_launches

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real"),
]

from pikaserve.attention.layout import BatchLayout  # noqa: E402
from pikaserve.engine.sampling_params import SamplingParams  # noqa: E402
from pikaserve.kernels import fused  # noqa: E402
from pikaserve.llm import LLM  # noqa: E402
from reference import make_prompts  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def smollm2_shaped_launches(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """SmolLM2-135M's layer shapes (9 query heads on 3 KV heads of 64, width 576, MLP 1536):
    one step holding a decode row over 300 cached tokens and a 20-token chunk over 300 more."""
    from pikaserve.attention.triton_backend import TritonBackend

    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    seqs = [(1, 300), (20, 320)]
    tables, slots, positions, first = [], [], [], 0
    for query_len, context_len in seqs:
        table = np.arange(first, first + -(-context_len // block_size), dtype=np.int64)
        first += len(table)
        pos = np.arange(context_len - query_len, context_len)
        tables.append(table)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        positions.append(pos)
    layout = BatchLayout(
        query_lens=np.array([q for q, _ in seqs]), context_lens=np.array([c for _, c in seqs]),
        block_tables=tables, slot_mapping=np.concatenate(slots),
        positions=np.concatenate(positions), block_size=block_size)
    t = layout.num_tokens
    q = torch.randn(t, heads, dim, dtype=dtype)
    k, v = torch.randn(2, t, kv_heads, dim, dtype=dtype)
    caches = torch.randn(2, first, block_size, kv_heads, dim).to(kv_dtype)
    backend = TritonBackend(heads, kv_heads)
    meta = backend.metadata(layout, torch.device("cpu"), dtype)
    backend.layer(heads, kv_heads, dim).forward(q, k, v, caches[0], caches[1], meta)

    x, residual, weight = torch.randn(3, t, 576, dtype=dtype)
    fused.rms_norm(x, weight[0], 1e-5)
    fused.add_rms_norm(x, residual, weight[0], 1e-5)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos, sin = torch.randn(2, t, dim, dtype=dtype)
    fused.rotary(qkv.view(t, -1, dim)[:, : heads + kv_heads], cos, sin)
    fused.silu_mul(torch.randn(t, 2 * 1536, dtype=dtype))


def test_every_launch_compiles_for_sm80_and_sm90(tiny_model_dir, tmp_path):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    with record_launches() as launches:
        for dtype in DTYPES:
            # an engine's own steps: prefill chunks over cached prefixes, decodes, split keys
            llm = LLM(str(tiny_model_dir("qwen3")), dtype=str(dtype).removeprefix("torch."),
                      attention_backend="triton", max_num_batched_tokens=32, block_size=4)
            llm.generate(make_prompts(4, 400, seed=5), params)
            for kv_dtype in {dtype, torch.float8_e4m3fn} - {torch.float32}:
                smollm2_shaped_launches(dtype, kv_dtype)
        smollm2_shaped_launches(torch.float32, torch.float32)
    kernels = {r["kernel"] for r in launches}
    assert {"_store_kv", "_paged_attention", "_merge_splits", "_rms_norm_kernel",
            "_rotary_kernel", "_silu_mul_kernel"} <= kernels
    assert any("*fp8e4nv" in r["signature"].values() for r in launches)
    assert compile_for_gpus(launches, tmp_path) == []
