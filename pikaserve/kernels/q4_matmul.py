"""float32 rows times 4-bit GGUF weights in integer arithmetic (q4_matmul.c), for AVX2 CPUs.

On a CPU without native bfloat16 the model runs float32 matmuls, compute-bound at the ~50
rows of a Pika prefill and memory-bound on 540 MB of float32 weights at a few rows. The C
kernel multiplies the GGUF's own 4-bit codes by activations quantized to int8 per group of 32
(llama.cpp's arithmetic): 1.4-2x float32's speed from 6 to 1024 rows and 2.5-3.8x at 1-2 rows
on SmolLM2's shapes, capped to AVX2 on the project's CPU; with VNNI ~1.5x more
(docs/performance.md).

Its 8-bit sibling (`q8`) serves the LM head from int8 codes per group of 32. Both give a row
the same bits at any row count. It is x86 code (AVX2 + FMA intrinsics), compiled on first use
like cpu_kernels.c and for the same instruction sets; elsewhere `load("auto")` returns None
and the model keeps float32.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch

from pikaserve.config import ConfigError
from pikaserve.kernels import cpu_native

SOURCE = Path(__file__).with_name("q4_matmul.c")
GROUP = 32  # values per scale along K (the GGUF's group)
TILE = 8  # output channels per packed tile
# Without VNNI the kernel beats oneDNN's AVX2 float32 at every row count, but oneDNN's AVX512
# float32 only on few rows (AVX512 CPUs without VNNI, e.g. Skylake-SP). Measured here, the
# AVX2 build against AVX512 float32 on SmolLM2's shapes: 2.3-3.8x at 2 rows, 1.0-1.4x at 8,
# 0.8-1.0x at 16, 0.7-0.9x at 32.
NO_VNNI_AVX512_MAX_ROWS = 8

_P, _I = ctypes.c_void_p, ctypes.c_int64


class Q4Matmul:
    """The compiled kernel. Weights come packed by model/q4_int8_weights.py."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fn = library.q4_matmul
        self._fn.argtypes, self._fn.restype = [_P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I], None
        self._q8 = library.q8_matmul
        self._q8.argtypes, self._q8.restype = [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I], None
        library.uses_vnni.restype = ctypes.c_int64
        # built for a CPU with VNNI (vpdpbusd) rather than AVX2's vpmaddubsw alone
        self.vnni = bool(library.uses_vnni())

    def address(self) -> int:
        """The entry point of q4_matmul, for C callers (kernels/decode_layer.py)."""
        return ctypes.cast(self._fn, ctypes.c_void_p).value or 0

    def max_rows(self) -> int | None:
        """The most rows a pass may have for this kernel to beat oneDNN's float32 here: all
        (None) with VNNI or on an AVX2 CPU, a few on AVX512 without VNNI."""
        if self.vnni or torch.backends.cpu.get_cpu_capability() != "AVX512":
            return None
        return NO_VNNI_AVX512_MAX_ROWS

    def __call__(
        self,
        x: torch.Tensor,  # [M, K] float32, rows may be strided
        codes: torch.Tensor,  # [N / 8, K / 8, 32] uint8
        scales: torch.Tensor,  # [N / 8, K / 32, 8] float32
        minimums: torch.Tensor,  # [N / 8, K / 32, 8] float32
    ) -> torch.Tensor:  # [M, N] float32
        return self._run(self._fn, x, codes, scales, minimums)

    def q8(
        self,
        x: torch.Tensor,  # [M, K] float32, rows may be strided
        codes: torch.Tensor,  # [N / 8, K / 4, 32] int8
        scales: torch.Tensor,  # [N / 8, K / 32, 8] float32
    ) -> torch.Tensor:  # [M, N] float32
        """The 8-bit sibling (signed codes, a scale per group of 32; model/q8_int8_weights.py)."""
        return self._run(self._q8, x, codes, scales)

    @staticmethod
    def _run(fn, x: torch.Tensor, codes: torch.Tensor, *per_group: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, k = x.shape
        n = codes.shape[0] * TILE
        out = torch.empty((rows, n), dtype=torch.float32)
        if rows:
            fn(x.data_ptr(), x.stride(0), codes.data_ptr(), *(t.data_ptr() for t in per_group),
               out.data_ptr(), n, rows, n, k, torch.get_num_threads())
        return out


def available() -> bool:
    """An x86 CPU whose kernels torch runs at AVX2 or above (so not capped below it)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def load(mode: str) -> Q4Matmul | None:
    """mode "off": None; "auto": None where the kernel cannot run or build here (the latter
    logged); "on": a ConfigError then."""
    if mode == "off":
        return None
    if not available():
        if mode == "on":
            raise ConfigError("q4_int8_matmul 'on' needs an x86 CPU with AVX2 (this one runs "
                              f"{platform.machine()} / {torch.backends.cpu.get_cpu_capability()})")
        return None
    built = cpu_native.open_library(SOURCE, "q4_int8_matmul 'on'" if mode == "on" else None,
                                    "float32 matmuls instead")
    return None if built is None else Q4Matmul(*built)
