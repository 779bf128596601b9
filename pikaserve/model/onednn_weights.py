"""Linear weights reordered once into oneDNN's blocked layout, for CPU matmuls.

Given a plain row-major weight, oneDNN (torch's CPU matmul backend for bfloat16) reorders it
into its blocked layout on every call: for a model whose weights stream from memory each
pass, that is a second pass over them. Reordering once at load made SmolLM2-135M's 30 layers
1.5-2x faster on the project's CPU (68 -> 45 ms at 56 rows, 22 -> 13 ms at one row;
docs/performance.md), with bit-identical bfloat16 results. It uses the ops torch.compile's
CPU backend emits for the same purpose.
"""

from __future__ import annotations

import torch

# Reorder hint: the typical number of rows. The layout chosen barely depended on it here.
_ROWS_HINT = 64


def reorder(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] in oneDNN's layout, or None where that is unavailable (no oneDNN, not a
    CPU tensor, a dtype it does not take)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
    except (RuntimeError, AttributeError):  # a torch build without these ops
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times a reordered weight, plus bias: F.linear's result."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
