"""A 4-bit GGUF weight packed for the integer Q4 x int8 kernel (kernels/q4_matmul.c).

The weight is the GGUF's own (codes 0..15 with a scale and a minimum per group of 32 along K,
model/int4_weights.py), so nothing is requantized; only the activations are, to int8 per
group of 32 inside the kernel. Results are ~0.5% off float32 (max error over max value),
like llama.cpp's.
"""

from __future__ import annotations

import torch

from pikaserve.kernels.q4_matmul import GROUP, TILE, Q4Matmul
from pikaserve.model.int4_weights import Int4Groups


def can_pack(shape: tuple[int, int]) -> bool:
    n, k = shape
    return n % TILE == 0 and k % GROUP == 0


def tiled(per_group: torch.Tensor) -> torch.Tensor:
    """[N, K / 32] -> [N / 8, K / 32, 8] float32: a tile's 8 channels side by side, as both
    integer kernels read their scales."""
    n, groups = per_group.shape
    return per_group.float().view(n // TILE, TILE, groups).transpose(1, 2).contiguous()


class Q4Int8Weight:
    """[N, K] 4-bit codes in tiles of 8 output channels, with their scales and minimums."""

    def __init__(self, groups: Int4Groups, kernel: Q4Matmul) -> None:
        n, k = groups.codes.shape
        # [tile, 8 channels, step of 8 along K, half, 4] -> [tile, step, channel, 4, half]:
        # each 32-byte step holds k = 8t..8t+3 in its low nibbles, 8t+4..8t+7 in its high ones
        c = groups.codes.view(n // TILE, TILE, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
        self.codes = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n // TILE, k // 8, 32)
        self.scales = tiled(groups.scale)
        self.minimums = tiled(groups.minimum)
        self.kernel = kernel

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N] float32."""
        return self.kernel(x, self.codes, self.scales, self.minimums)
