"""Weight-only int8 copies of weights, for CPU passes over one or two rows.

On a CPU without native bfloat16 (AVX2, AVX512 without BF16) the model runs in float32, and a
pass over a row or two (a decode step) is the time to stream 540 MB of float32 weights for
SmolLM2-135M. torch's int8 weight-only kernel reads a quarter of the bytes: codes per output
channel with one scale, and activations in bfloat16 (converted in registers, and all the
kernel takes; its float32 path is 7-30x slower). Capped to AVX2 on the project's CPU, one row
through a layer's four matmuls took 100 us against 169 us in float32, and the LM head 0.86 ms
against 2.3 ms; from three rows on float32 is as fast or faster (docs/performance.md), so the
model keeps both copies and picks by row count. Results are ~1% off float32 (bfloat16
activations, per-channel int8), like a bfloat16 model's.

A bfloat16 model's layers have a 4-bit path instead; asked for (`int8_max_rows`), its LM head
gets an int8 copy: at one row 0.74 against 1.06 ms, batch-1 decoding 1.10x faster. Not by
default: which arithmetic a row gets then depends on its step's row count, and greedy outputs
with speculation differed from those without (docs/performance.md).
"""

from __future__ import annotations

import torch


class Int8Weight:
    """A [N, K] weight as int8 codes times a bfloat16 scale per output channel."""

    def __init__(self, weight: torch.Tensor) -> None:
        # the scale is rounded to bfloat16 first, so the codes are fitted to the scale used
        scale = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)
        codes = (weight / scale.float()[:, None]).round_().clamp_(-127, 127)
        self.codes = codes.to(torch.int8).contiguous()
        self.scale = scale

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 -> [M, N] of the same dtype."""
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scale).to(x.dtype)
