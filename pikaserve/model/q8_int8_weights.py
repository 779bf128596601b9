"""A float weight as int8 codes per group of 32, for the Q8 x int8 kernel (kernels/q4_matmul.c).

For the float32 class's LM head (SmolLM2's is its Q8_0 embedding table): requantized per
group of 32 along K, as Q8_0 stores it, so a Q8_0 weight comes back to its own codes. The
kernel gives every row the same bits alone and in any step, so greedy outputs do not depend
on how many rows a step has (torch's int8 kernel for 1-2-row steps did: docs/performance.md).
"""

from __future__ import annotations

import torch

from pikaserve.kernels.q4_matmul import GROUP, TILE, Q4Matmul
from pikaserve.model.q4_int8_weights import tiled


def can_pack(shape: tuple[int, int]) -> bool:
    return shape[1] % GROUP == 0  # N is padded to whole tiles


class Q8Int8Weight:
    """[N, K] int8 codes in tiles of 8 output channels, with a float scale per group of 32."""

    def __init__(self, weight: torch.Tensor, kernel: Q4Matmul) -> None:
        self.n = weight.shape[0]  # a vocabulary need not fill whole tiles: zero rows pad it
        weight = torch.nn.functional.pad(weight.float(), (0, 0, 0, -self.n % TILE))
        n, k = weight.shape
        groups = weight.view(n, k // GROUP, GROUP)
        scale = groups.abs().amax(-1) / 127  # [N, K / 32]
        codes = torch.where(scale[..., None] > 0, groups / scale[..., None], 0).round_()
        # [tile, 8 channels, step of 4 along K, 4] -> [tile, step, channel, 4]
        steps = codes.to(torch.int8).view(n // TILE, TILE, k // 4, 4).transpose(1, 2)
        self.codes = steps.contiguous().view(n // TILE, k // 4, 32)
        self.scales = tiled(scale)
        self.kernel = kernel

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N] float32."""
        y = self.kernel.q8(x, self.codes, self.scales)
        return y if y.shape[1] == self.n else y[:, :self.n]
