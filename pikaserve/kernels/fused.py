"""Fused elementwise/row kernels for the Llama-family model on CUDA, and their torch references.

Why fuse: each of these replaces a chain of 3-8 small eager ops (casts, a reduction, muls, adds,
a cat) with one launch that reads its inputs once and writes its outputs once. A SmolLM2-135M
step is launch-bound (hundreds of tiny kernels per forward), so fewer launches is most of the
win; the saved round trips of activations through HBM are the rest on larger batches.

Numerics follow the references below op by op: every value the eager code would round to the
model dtype is rounded here too (computed in float32, cast to the dtype, widened again), so
the kernels agree with the references bit for bit except where float32 reductions or exp differ
in their last bit and that lands on a rounding boundary. Rotary is the exception: it rounds
once (see _rotary_kernel), one half-precision ulp from eager torch on ~10% of elements.

Each kernel takes one row (or one token) per program; no autotune, so launches are plain and
capture into CUDA graphs, and num_warps follows the tile width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ---------------------------------------------------------------------------- references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


def rotary_reference(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32, rounded once to qk's dtype (see _rotary_kernel)."""
    x, cos, sin = qk.float(), cos.float()[:, None], sin.float()[:, None]
    x1, x2 = x.chunk(2, -1)
    return (x * cos + torch.cat((x2, x1), -1) * sin).to(qk.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- kernels


def _num_warps(elements: int) -> int:
    return max(1, min(16, elements // 256))


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, sum_ptr, out_ptr,
    stride_x, stride_res, width, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # the reference adds in the model dtype
        tl.store(sum_ptr + row * width + cols, s, mask=mask)
        x = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # the product of two dtype values is exact in float32, so one rounding = a dtype multiply
    tl.store(out_ptr + row * width + cols, (w * normed).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    qk_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_t, stride_h, stride_cos, stride_sin, heads, dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)
    mask = (h < heads) & (d < dim)[None, :]
    partner = (d + dim // 2) % dim  # cat((x2, x1)) read in place: no second buffer
    dtype = out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=d < dim, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=d < dim, other=0.0).to(tl.float32)
    base = qk_ptr + t * stride_t + h * stride_h
    x = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    # Rounded once, not after each product as eager torch does: on an H200 the compiler fused
    # a rounded product into the add (an FMA), so per-op rounding came out compiler-dependent.
    # A product of two half-precision values is exact in float32, so with or without an FMA
    # this sum rounds to the same bits everywhere.
    rotated = x * cos[None, :] + xp * sin[None, :]
    tl.store(out_ptr + (t * heads + h) * dim + d[None, :], rotated.to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # torch's formula, rounded
    tl.store(out_ptr + row * inter + cols, (silu * up).to(dtype), mask=mask)


# ---------------------------------------------------------------------------- wrappers


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    summed: torch.Tensor | None, out: torch.Tensor,
) -> None:
    rows, width = x.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(width)
    res = x if residual is None else residual  # unread placeholders when there is no residual
    _rms_norm_kernel[(rows,)](
        x, res, weight, out if summed is None else summed, out,
        x.stride(0), res.stride(0), width, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, H] in float32, rounded to x's dtype, times weight [H]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, None, weight, eps, None, out)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + residual in the model dtype, in one launch."""
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(summed)
    _launch_norm(x, residual, weight, eps, summed, out)
    return summed, out


def rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of qk [T, heads, D] (a strided view is fine) with per-row tables
    cos, sin [T, D] (sin pre-signed); returns a new contiguous [T, heads, D]."""
    tokens, heads, dim = qk.shape
    out = torch.empty((tokens, heads, dim), dtype=qk.dtype, device=qk.device)
    if tokens == 0:
        return out
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim)
    _rotary_kernel[(tokens,)](
        qk, cos, sin, out,
        qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0), heads, dim,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_num_warps(block_h * block_d),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] (gate first); returns [T, I]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), inter, BLOCK=block, num_warps=_num_warps(block)
    )
    return out
