"""The compiled CPU kernels (kernels/cpu_kernels.c) against the eager PyTorch ops they replace,
their build and fallback, and the engine choosing them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pikaserve.attention.backend import select_backend
from pikaserve.attention.layout import LayoutBuilder
from pikaserve.attention.torch_backend import TorchBackend
from pikaserve.config import ConfigError
from pikaserve.kernels import cpu_native
from pikaserve.model.llama import RMSNorm

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernels() -> cpu_native.CpuKernels:
    native = cpu_native.load("native")
    assert native is not None
    return native


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 within 1e-5; bfloat16 bit-equal on >= 99% of elements (a float32 sum or exp in
    another order may flip one rounding) and within one bfloat16 step elsewhere."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    if actual.numel():
        assert (actual == expected).float().mean().item() >= 0.99
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1e-2)


def eager_norm(width: int, weight: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(width, eps, {"dtype": weight.dtype}, None)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width", [(1, 576), (7, 576), (33, 100), (0, 64)])
def test_rms_norm_and_residual_add(kernels, dtype, tokens, width):
    x = randn(tokens, 2 * width, dtype=dtype, seed=1)[:, :width] * 3  # strided rows
    residual = randn(tokens, width, dtype=dtype, seed=2)
    weight = randn(width, dtype=dtype, seed=3)
    norm = eager_norm(width, weight, 1e-5)
    assert_matches(kernels.rms_norm(x, weight, 1e-5), norm(x))
    summed, normed = kernels.add_rms_norm(x, residual, weight, 1e-5)
    want_summed, want_normed = norm.add_forward(x, residual)
    assert torch.equal(summed, want_summed)  # one add in the model dtype: exact
    assert_matches(normed, want_normed)
    columns = x.T.contiguous().T  # the same values, the last dimension strided
    assert torch.equal(kernels.rms_norm(columns, weight, 1e-5), kernels.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim", [(1, 64), (5, 128), (0, 64)])
def test_rotary_of_a_strided_view(kernels, dtype, tokens, dim):
    qkv = randn(tokens, 15, dim, dtype=dtype, seed=4)
    qk = qkv[:, :12]  # queries and keys of a fused projection, values left out
    angles = torch.arange(tokens).float()[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    out = kernels.rotary(qk, cos, sin)
    # rotate-half in float32, rounded once (the eager path rounds after each op)
    x, c, s = qk.float(), cos.float()[:, None], sin.float()[:, None]
    x1, x2 = x.chunk(2, -1)
    assert out.is_contiguous()
    assert_matches(out, (x * c + torch.cat((x2, x1), -1) * s).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 40])
def test_silu_mul_writes_over_the_gate_with_the_same_bits(kernels, dtype, tokens):
    gate_up = randn(tokens, 2 * 96, dtype=dtype, seed=4) * 4
    gate, up = gate_up.clone().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(gate_up)
    assert torch.equal(got, want)
    assert got.data_ptr() == gate_up.data_ptr()  # in place: no new [tokens, I] tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_ops_run_alike_on_one_thread_and_several(kernels, dtype, monkeypatch):
    x, residual = randn(40, 576, dtype=dtype, seed=8), randn(40, 576, dtype=dtype, seed=9)
    weight = randn(576, dtype=dtype, seed=10)
    qk = randn(40, 12, 64, dtype=dtype, seed=11)
    cos, sin = randn(40, 64, dtype=dtype, seed=12), randn(40, 64, dtype=dtype, seed=13)

    def run():
        return (*kernels.add_rms_norm(x, residual, weight, 1e-5), kernels.rotary(qk, cos, sin))

    monkeypatch.setattr(cpu_native, "PARALLEL_ELEMENTS", 10**9)
    serial = run()
    monkeypatch.setattr(cpu_native, "PARALLEL_ELEMENTS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


def paged_step(seqs, block_size, heads, kv_heads, dim, dtype, seed):
    """A step of sequences (new tokens, context length) whose blocks are scattered through the
    cache; returns the layout and q, k, v and the two caches."""
    num_blocks = sum(-(-c // block_size) for _, c in seqs) + 3
    free = list(np.random.default_rng(seed).permutation(num_blocks))
    builder = LayoutBuilder(block_size)
    for n, context in seqs:
        builder.add([free.pop() for _ in range(-(-context // block_size))], context - n, n)
    layout = builder.build()
    t = layout.num_tokens
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
              for _ in range(2)]
    return layout, q, k, v, caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [
    (9, 3, 64), (8, 2, 64), (2, 2, 128), (4, 2, 128),  # groups of 1-4 with 64 or 128 dims
    (4, 4, 32), (8, 1, 128), (6, 2, 16),  # the general path: other sizes, a group of 8
])
@pytest.mark.parametrize("block_size", [1, 3, 4, 32])
@pytest.mark.parametrize("seqs", [
    [(1, 9), (1, 30), (1, 2)],  # ragged decodes
    [(5, 13)],  # one draft
    [(1, 6), (3, 11), (20, 50), (8, 8), (2, 40)],  # rows around a prefill chunk
    [(1, 700)],  # long enough to run on several threads
    [(9, 9), (40, 340), (13, 13), (150, 700)],  # prefill chunks, fresh and over cached keys
])
def test_attention_kernels_match_sdpa_per_sequence(seqs, block_size, heads, kv_heads, dim, dtype,
                                                   monkeypatch, kernels):
    """Every row through the kernels (attention_rows for rows, attention_chunks for prefill
    chunks) equals each sequence attended by its own SDPA call (the torch backend with
    batching off)."""
    from pikaserve.attention import torch_backend

    layout, q, k, v, caches = paged_step(seqs, block_size, heads, kv_heads, dim, dtype, seed=6)
    native = TorchBackend(kernels)
    meta = native.metadata(layout, CPU, dtype)
    got = native.layer(heads, kv_heads, dim).forward(q, k, v, *[c.clone() for c in caches], meta)

    monkeypatch.setattr(torch_backend, "MAX_BATCHED_ROWS", 0)  # one SDPA call per sequence
    plain = TorchBackend()
    want = plain.layer(heads, kv_heads, dim).forward(
        q, k, v, *caches, plain.metadata(layout, CPU, dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_sharing_cached_blocks_match_sdpa(kernels, dtype, monkeypatch):
    """Chunks whose block tables start with the same cached blocks, as prefix caching hands
    out, read those keys from one packed copy (attention_chunks packs them once): whole,
    partly and not shared prefixes, against one SDPA call per sequence."""
    from pikaserve.attention import torch_backend

    block_size, heads, kv_heads, dim = 4, 9, 3, 64
    system = list(range(100))  # 400 cached keys
    fresh = iter(range(100, 1000))
    seqs = [  # (shared blocks, cached keys, new tokens)
        (100, 400, 60), (100, 405, 30), (10, 200, 50), (0, 0, 80), (100, 400, 9), (3, 12, 40)]
    builder = LayoutBuilder(block_size)
    for blocks, cached, n in seqs:
        own = -(-(cached + n) // block_size) - blocks
        builder.add(system[:blocks] + [next(fresh) for _ in range(own)], cached, n)
    layout = builder.build()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(layout.num_tokens, h, dim, generator=g).to(dtype)
               for h in (heads, kv_heads, kv_heads))
    caches = [torch.randn(1000, block_size, kv_heads, dim, generator=g).to(dtype)
              for _ in range(2)]
    native = TorchBackend(kernels)
    got = native.layer(heads, kv_heads, dim).forward(
        q, k, v, *[c.clone() for c in caches], native.metadata(layout, CPU, dtype))
    monkeypatch.setattr(torch_backend, "MAX_BATCHED_ROWS", 0)
    plain = TorchBackend()
    want = plain.layer(heads, kv_heads, dim).forward(
        q, k, v, *caches, plain.metadata(layout, CPU, dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_attention_runs_alike_on_one_thread_and_several(kernels, monkeypatch):
    layout, q, k, v, caches = paged_step([(1, 300), (4, 90), (1, 5), (30, 200)], 4, 9, 3, 64,
                                         torch.float32, seed=7)
    backend = TorchBackend(kernels)
    layer = backend.layer(9, 3, 64)
    meta = backend.metadata(layout, CPU, torch.float32)
    monkeypatch.setattr(cpu_native, "PARALLEL_WORK", 10**9)
    serial = layer.forward(q, k, v, *caches, meta)
    monkeypatch.setattr(cpu_native, "PARALLEL_WORK", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = layer.forward(q, k, v, *caches, meta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)  # each task's arithmetic is the same on any thread


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("PIKASERVE_CACHE_DIR", str(tmp_path))
    first = cpu_native.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert cpu_native.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt


def test_a_new_build_removes_the_sources_stale_builds(tmp_path, monkeypatch):
    """Each change of the source, compiler or CPU leaves a build behind: a new build removes
    the same source's builds unused for 30 days, and no other."""
    import os
    import time

    monkeypatch.setenv("PIKASERVE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    month_ago = time.time() - 31 * 86400
    stale, recent, other = (folder / name for name in (
        "cpu_kernels-0000000000000000.so", "cpu_kernels-1111111111111111.so",
        "q4_matmul-2222222222222222.so"))
    for path in (stale, recent, other):
        path.write_bytes(b"")
    for path in (stale, other):
        os.utime(path, (month_ago, month_ago))
    built = cpu_native.build()
    assert built.exists() and recent.exists() and other.exists() and not stale.exists()


def test_without_a_compiler_auto_falls_back_and_native_refuses(tmp_path, monkeypatch):
    """Both C files (this one's and the Q4 x int8 kernel's) build through open_library."""
    from pikaserve.kernels import q4_matmul

    monkeypatch.setenv("PIKASERVE_CACHE_DIR", str(tmp_path))  # nothing cached
    monkeypatch.setenv("CC", "no-such-compiler")
    assert cpu_native.load("auto") is None
    with pytest.raises(ConfigError, match="cpu_kernels 'native': could not build"):
        cpu_native.load("native")
    backend = select_backend("auto", CPU, torch.float32, torch.float32, 9, 3, 64, "auto")
    assert backend.fused_kernels is None  # plain PyTorch, still serving
    if q4_matmul.available():
        assert q4_matmul.load("auto") is None
        with pytest.raises(ConfigError, match="q4_int8_matmul 'on': could not build"):
            q4_matmul.load("on")


def test_backend_choice(kernels):
    def backend(dtype, head_dim=64, cpu_kernels="auto"):
        return select_backend("auto", CPU, dtype, dtype, 9, 3, head_dim, cpu_kernels)

    assert backend(torch.bfloat16).fused_kernels is not None
    assert backend(torch.float32).fused_kernels is not None
    assert backend(torch.float32, cpu_kernels="torch").fused_kernels is None
    odd = kernels.dim_multiple + 4  # not a multiple of the vector width (16 or 8 floats)
    assert backend(torch.float32, head_dim=odd).fused_kernels is None
    with pytest.raises(ConfigError, match="head_dim"):
        backend(torch.float32, head_dim=odd, cpu_kernels="native")


def test_bad_cpu_kernels_value_is_a_config_error():
    from pikaserve.config import EngineConfig

    with pytest.raises(ConfigError, match="cpu_kernels must be one of"):
        EngineConfig(cpu_kernels="fast").validate()
