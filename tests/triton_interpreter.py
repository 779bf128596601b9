"""Runs Triton kernels on this CPU: TRITON_INTERPRET=1 unless CUDA is here, and two fixes to the
interpreter itself, so that it computes what a GPU does. Only the interpreter is patched; the
kernels are the ones that run on the GPU.

- It holds bfloat16 values as raw uint16 (numpy has no bfloat16), and its tl.dot multiplies
  those integers: every bf16 dot comes out as garbage. Widening the operands to float32 first
  gives the GPU's result (bf16 products, float32 accumulation).
- It truncates float32 -> bfloat16 casts where a GPU rounds to nearest even, so a kernel that
  rounds to bf16 on purpose comes out up to 1 ulp low.
"""

from __future__ import annotations

import os


def interpret_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no triton: the kernel tests skip
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "widens_bf16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original_cast(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)  # 0-d scalars too
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x0040
        out = np.where(np.isnan(src.data), quiet_nan, rounded).astype(np.uint16)
        return interpreter.TensorHandle(out, tl.bfloat16)

    create_dot.widens_bf16 = True
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
