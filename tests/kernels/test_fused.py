"""The fused Triton kernels against their torch references (under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton]

from pikaserve.kernels import fused  # noqa: E402  (after the skip: it imports triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = [0, 1, 7, 33]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 within 1e-5 (plus 1e-5 relative: a GPU's exp and rsqrt are a few ulp off, more
    than 1e-5 on values near 100). Half types: bit-equal on >= 99% of elements and near
    elsewhere (a float32 sum or exp that differs in its last bit can flip one rounding)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.numel() == 0:
        return
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    equal = (actual == expected).float().mean().item()
    assert equal >= 0.99, f"only {equal:.4f} of elements equal the reference"
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1e-2)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 576, 100])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(tokens: int, width: int, dtype: torch.dtype) -> None:
    x = randn(tokens, width, dtype=dtype, seed=1) * 3
    weight = randn(width, dtype=dtype, seed=2)
    assert_matches(fused.rms_norm(x, weight, 1e-5), fused.rms_norm_reference(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [576, 100])
@pytest.mark.parametrize("tokens", TOKENS)
def test_add_rms_norm(tokens: int, width: int, dtype: torch.dtype) -> None:
    x = randn(tokens, width, dtype=dtype, seed=3)
    residual = randn(tokens, width, dtype=dtype, seed=4) * 4
    weight = randn(width, dtype=dtype, seed=5)
    summed, normed = fused.add_rms_norm(x, residual, weight, 1e-6)
    ref_summed, ref_normed = fused.add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one dtype add: exact
    assert_matches(normed, ref_normed)


def rope_tables(tokens: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos and pre-signed sin for positions 0..tokens-1, like the model looks up."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(tokens).float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return (
        torch.cat((cos, cos), -1).to(dtype=dtype, device=DEVICE),
        torch.cat((-sin, sin), -1).to(dtype=dtype, device=DEVICE),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary(tokens: int, dim: int, dtype: torch.dtype) -> None:
    qk = randn(tokens, 12, dim, dtype=dtype, seed=6)
    cos, sin = rope_tables(tokens, dim, dtype)
    out = fused.rotary(qk, cos, sin)
    assert out.is_contiguous()
    assert_matches(out, fused.rotary_reference(qk, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [2, 7])
def test_rotary_strided_view_of_qkv(tokens: int, dtype: torch.dtype) -> None:
    # q and k heads taken out of a fused qkv projection: token stride covers the v heads too
    q_heads, kv_heads, dim = 9, 3, 64
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * dim, dtype=dtype, seed=7)
    qk = qkv.view(tokens, q_heads + 2 * kv_heads, dim)[:, : q_heads + kv_heads]
    assert not qk.is_contiguous()
    cos, sin = rope_tables(tokens, dim, dtype)
    before = qkv.clone()
    assert_matches(fused.rotary(qk, cos, sin), fused.rotary_reference(qk.contiguous(), cos, sin))
    assert torch.equal(qkv, before)  # the input is not written


def test_rotary_odd_head_dim_and_strided_tables() -> None:
    # D not a power of two; cos and sin are column slices of one wider table
    tokens, heads, dim = 5, 3, 80
    qk = randn(tokens, heads, dim, dtype=torch.bfloat16, seed=8)
    cos, sin = rope_tables(tokens, dim, torch.bfloat16)
    table = torch.cat((cos, sin), -1)
    cos_view, sin_view = table[:, :dim], table[:, dim:]
    assert_matches(
        fused.rotary(qk, cos_view, sin_view), fused.rotary_reference(qk, cos_view, sin_view)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 96])
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul(tokens: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=9) * 3
    out = fused.silu_mul(gate_up)
    assert out.shape == (tokens, inter)
    assert_matches(out, fused.silu_mul_reference(gate_up))


def test_rms_norm_strided_rows() -> None:
    # rows of a wider buffer (last dim contiguous): the row stride is honoured
    buf = randn(7, 200, dtype=torch.bfloat16, seed=10)
    x, weight = buf[:, :100], randn(100, dtype=torch.bfloat16, seed=11)
    assert_matches(fused.rms_norm(x, weight, 1e-5), fused.rms_norm_reference(x, weight, 1e-5))
