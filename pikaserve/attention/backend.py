"""The attention backend interface, and which backend a device gets.

A backend makes one attention object per layer and turns a step's BatchLayout into the
metadata its layers read. `torch` (attention/torch_backend.py) runs anywhere in plain PyTorch;
`triton` (attention/triton_backend.py) is for CUDA: one launch per layer for any mix of decode
rows, prefill chunks and drafts, plus fused kernels for the small ops around attention.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pikaserve.attention.layout import BatchLayout
from pikaserve.config import ConfigError


class LayerAttention(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        """Writes the new keys and values to their slots, then attends: [T, Hq, D]."""


class AttentionBackend(Protocol):
    name: str
    uses_fused_kernels: bool  # the model then runs norm, rope and SiLU through kernels/fused.py

    def layer(self, num_heads: int, num_kv_heads: int, head_dim: int) -> LayerAttention: ...

    def metadata(self, layout: BatchLayout, device: torch.device, dtype: torch.dtype) -> Any: ...


def select_backend(
    name: str, device: torch.device, kv_cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int
) -> AttentionBackend:
    """auto: triton on CUDA when it imports, torch otherwise. An explicit choice is honoured
    (triton on a CPU runs under TRITON_INTERPRET=1, which is how its tests run here)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "triton":
        if not _triton_available():
            raise ConfigError("attention_backend 'triton' needs the triton package "
                              "(pip install \"pikaserve[triton]\")")
        from pikaserve.attention.triton_backend import TritonBackend

        return TritonBackend(num_heads, num_kv_heads)
    if kv_cache_dtype.is_floating_point and kv_cache_dtype.itemsize == 1:
        raise ConfigError("an fp8 KV cache needs the triton attention backend (CUDA)")
    from pikaserve.attention.torch_backend import TorchBackend

    return TorchBackend()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
