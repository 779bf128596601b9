"""Dequantize GGUF tensors into torch tensors.

The common ggml block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and the plain
float types are unpacked with vectorised torch ops; every other type goes through gguf's own
numpy dequantizer. Each torch kernel mirrors gguf's numpy reference operation for operation
(same float32 products and sums, in the same order), so the results are bit-identical to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf import quants as gguf_quants

from pikaserve.model.checkpoint import ModelLoadError

Q = GGMLQuantizationType
# Dequantize this many values per kernel call. At or below torch's intra-op grain size
# (32768) every op runs inline on one thread: on a busy 2-core box, bigger chunks that fan
# out to OpenMP threads ran 5-20x slower, and whole-tensor ops thrash the cache.
_CHUNK_ELEMENTS = 1 << 15
_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def as_byte_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 torch view of a (read-only, memory-mapped) numpy array, without copying.

    torch warns that the buffer is not writable; nothing here writes to it (every dequantizer
    allocates its output, and float tensors are copied), so the warning is noise.
    """
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Unpack one tensor's raw GGUF data into a new `dtype` tensor of `shape` (torch order)."""
    if qtype in _FLOAT_TYPES:
        values = as_byte_tensor(raw).view(_FLOAT_TYPES[qtype]).reshape(shape)
        return values.to(dtype, copy=True)  # copy: never alias the read-only file mapping
    kernel = _TORCH_KERNELS.get(qtype)
    if kernel is None:
        return _numpy_dequantize(raw, qtype, shape).to(dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = as_byte_tensor(raw).reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = kernel(blocks[start : start + step])
    return out.reshape(shape)


def _numpy_dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    try:
        values = gguf_quants.dequantize(raw, qtype)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"GGUF tensor type {qtype.name} cannot be dequantized "
            f"(supported: {supported_type_names()})"
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def supported_type_names() -> str:
    """The ggml types `dequantize` handles, for error messages."""
    numpy_types = getattr(gguf_quants, "_type_traits", {})  # gguf-py's registry of block types
    names = set(_FLOAT_TYPES) | set(_TORCH_KERNELS) | set(numpy_types)
    return ", ".join(sorted(t.name for t in names))


# --- torch kernels: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 -------------


def f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 scale at byte `start` of every block, as a (n, 1) float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each `group` bytes, then their high nibbles (ggml's element order)."""
    grouped = qs.reshape(qs.shape[0], -1, group)
    return torch.stack([grouped & 0x0F, grouped >> 4], dim=2)


def _bit_planes(qh: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`qh`'s bits split into fields of `width` bits, least significant first, stacked on `dim`."""
    mask = (1 << width) - 1
    return torch.stack([(qh >> shift) & mask for shift in range(0, 8, width)], dim=dim)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of a little-endian uint32, for i in 0..31, as (n, 32) uint8."""
    return _bit_planes(qh, 1, dim=-1).reshape(-1, 32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_column(blocks, 0)
    q = nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], -1).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_column(blocks, 0), f16_column(blocks, 2)
    q = nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], -1).float()
    return d * q + m


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_column(blocks, 0)
    low = nibbles(blocks[:, 6:], 16).reshape(blocks.shape[0], -1)
    q = (low | (_high_bits32(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_column(blocks, 0), f16_column(blocks, 2)
    low = nibbles(blocks[:, 8:], 16).reshape(blocks.shape[0], -1)
    q = (low | (_high_bits32(blocks[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * f16_column(blocks, 0)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed into Q4_K/Q5_K's 12 scale bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _k_dequant(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: apply per-32 scales and mins to 256 unpacked values `q` (n, 8, 32)."""
    n = blocks.shape[0]
    d, dmin = f16_column(blocks, 0), f16_column(blocks, 2)
    sc, mn = k_scale_min(blocks[:, 4:16])
    scale = (d * sc.float()).reshape(n, -1, 1)
    offset = (dmin * mn.float()).reshape(n, -1, 1)
    return (scale * q.float() - offset).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    return _k_dequant(blocks, nibbles(blocks[:, 16:], 32).reshape(n, -1, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qh, qs = blocks[:, 16 : 16 + QK_K // 8], blocks[:, 16 + QK_K // 8 :]
    low = nibbles(qs, 32).reshape(n, -1, 32)
    high = _bit_planes(qh.reshape(n, 32), 1, dim=1)
    return _k_dequant(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, : QK_K // 2], blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = f16_column(blocks, QK_K // 2 + QK_K // 4 + QK_K // 16)
    scale = (d * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    low = nibbles(ql, 64).reshape(n, -1, 32)
    high = _bit_planes(qh.reshape(n, -1, 32), 2, dim=2).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scale * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


_TORCH_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
TORCH_VECTORISED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_TORCH_KERNELS) | frozenset(
    _FLOAT_TYPES
)
