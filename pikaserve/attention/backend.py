"""The attention backend interface, and which backend a device gets.

A backend makes one attention object per layer and turns a step's BatchLayout into the
metadata its layers read. `torch` (attention/torch_backend.py) runs anywhere in plain
PyTorch, and on a CPU uses the compiled kernels of kernels/cpu_native.py where they build;
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


class FusedKernels(Protocol):
    """RMSNorm, rope and SiLU * up, each in one kernel (kernels/fused.py documents them)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotary(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of [T, 2I] -> [T, I]; may write over `gate_up` (the CPU's does)."""


class AttentionBackend(Protocol):
    name: str
    @property
    def fused_kernels(self) -> FusedKernels | None:
        """What the model runs RMSNorm, rope and SiLU * up through (kernels/fused.py on triton,
        kernels/cpu_native.CpuKernels on a CPU), or None for plain PyTorch ops."""

    def layer(self, num_heads: int, num_kv_heads: int, head_dim: int) -> LayerAttention: ...

    def metadata(self, layout: BatchLayout, device: torch.device, dtype: torch.dtype) -> Any: ...


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype,
    num_heads: int, num_kv_heads: int, head_dim: int, cpu_kernels: str = "auto",
) -> AttentionBackend:
    """auto: triton on CUDA when it imports, torch otherwise. An explicit choice is honoured
    (triton on a CPU runs under TRITON_INTERPRET=1, which is how its tests run here).
    cpu_kernels (torch backend on a CPU): "auto" uses the compiled kernels where they build
    and fit the model, "native" requires them, "torch" never uses them."""
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

    if device.type != "cpu" or cpu_kernels == "torch":
        return TorchBackend()
    from pikaserve.kernels import cpu_native

    native = cpu_native.load(cpu_kernels)
    if native is not None and not native.supports(dtype, num_heads, num_kv_heads, head_dim):
        if cpu_kernels == "native":
            raise ConfigError(
                f"cpu_kernels 'native' covers float32 and bfloat16 models whose head_dim is "
                f"a multiple of {native.dim_multiple} up to {native.max_dim}")
        native = None
    return TorchBackend(native)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
