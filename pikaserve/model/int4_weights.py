"""4-bit GGUF weights kept packed, for CPU matmuls over a few rows.

A forward pass over a handful of rows (decode, a short forced chunk) reads every weight once
and does almost no arithmetic with it, so on a CPU its time is the time to stream the weights
from memory. Reading a Q4 GGUF's 4-bit codes instead of the dequantized bfloat16 copy moves a
quarter of the bytes: 4.6 vs 20.8 ms per pass for SmolLM2-135M's 30 layers at one row on the
project's CPU (docs/performance.md). From about 16 rows up the matmul is compute-bound and
the bfloat16 kernels win, so the model keeps both and picks by row count.

Q4_0, Q4_1 and Q4_K all store groups of 32 values as w = scale * q + minimum, q in 0..15.
torch's CPU int4 kernel computes w = (q - 8) * scale + zero, so zero = minimum + 8 * scale
maps them over without requantizing; only scale and zero are rounded to bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pikaserve.model.gguf_dequant import as_byte_tensor, f16_column, k_scale_min, nibbles

Q = GGMLQuantizationType
GROUP = 32  # values per (scale, zero) pair: ggml's sub-block size
# The packing routine splits N into tiles of 16 rows; K comes in whole groups.
_ROW_TILE = 16
_INNER_K_TILES = 2


@dataclass(slots=True)
class Int4Groups:
    """A [N, K] weight as 4-bit codes with a scale and a minimum per group of 32 along K."""

    codes: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K / 32] float32
    minimum: torch.Tensor  # [N, K / 32] float32

    @staticmethod
    def cat(parts: list[Int4Groups]) -> Int4Groups:
        """Stack weights along N (fusing q/k/v or gate/up)."""
        return Int4Groups(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]),
        )

    def map_rows(self, fn) -> Int4Groups:
        """Apply a row permutation (given as a function of a row-major tensor) to every part."""
        return Int4Groups(fn(self.codes), fn(self.scale), fn(self.minimum))

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        groups = self.codes.view(n, k // GROUP, GROUP).float()
        return (groups * self.scale[..., None] + self.minimum[..., None]).view(n, k)


INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})


def int4_groups(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> Int4Groups:
    """The codes, scales and minimums of a Q4_0 / Q4_1 / Q4_K tensor of `shape` [N, K]."""
    n, k = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = as_byte_tensor(raw).reshape(-1, type_size)
    if qtype == Q.Q4_0:  # w = d * (q - 8)
        scale = f16_column(blocks, 0)
        minimum = -8 * scale
        codes = nibbles(blocks[:, 2:], 16)
    elif qtype == Q.Q4_1:  # w = d * q + m
        scale, minimum = f16_column(blocks, 0), f16_column(blocks, 2)
        codes = nibbles(blocks[:, 4:], 16)
    elif qtype == Q.Q4_K:  # 256-value blocks of eight 32-groups: w = d*sc * q - dmin*mn
        sc, mn = k_scale_min(blocks[:, 4:16])
        scale = f16_column(blocks, 0) * sc.float()
        minimum = -(f16_column(blocks, 2) * mn.float())
        codes = nibbles(blocks[:, 16:], 32)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type with 32-value groups")
    groups = k // GROUP
    return Int4Groups(
        codes.reshape(n, k).contiguous(),
        scale.reshape(n, groups).contiguous(),
        minimum.reshape(n, groups).contiguous(),
    )


def can_pack(shape: tuple[int, int]) -> bool:
    n, k = shape
    return n % _ROW_TILE == 0 and k % GROUP == 0


class PackedInt4:
    """A weight in torch's CPU int4 layout; multiplies bfloat16 rows by it."""

    def __init__(self, groups: Int4Groups) -> None:
        self.weight = torch._convert_weight_to_int4pack_for_cpu(
            groups.codes.to(torch.int32), _INNER_K_TILES
        )
        zero = groups.minimum + 8 * groups.scale
        # [K / 32, N, 2]: the layout the kernel reads
        pairs = torch.stack([groups.scale, zero], dim=-1)
        self.scales_and_zeros = pairs.transpose(0, 1).contiguous().to(torch.bfloat16)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bfloat16 -> [M, N] bfloat16."""
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.weight, GROUP, self.scales_and_zeros
        )
