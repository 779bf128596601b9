"""A decoder layer's front in one C call for decode steps on the float32 CPU class
(decode_layer.c): norm, the qkv projection, rope, the KV write, attention, the output
projection, the second norm and the gate/up projection, through the same compiled functions
the unfused layer calls one by one from Python (the same bits, ~15 fewer Python calls a layer).

It strings together cpu_kernels.c's rms_norm, rotary and attention_rows and q4_matmul.c's
q4_matmul by their addresses in the libraries already loaded. model/llama.py uses it for
steps whose every new token is an attention row (PagedRows, no prefill chunks).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pikaserve.attention.metadata import PagedRows
from pikaserve.kernels import cpu_native
from pikaserve.kernels.cpu_native import CpuKernels
from pikaserve.kernels.q4_matmul import TILE, Q4Matmul

if TYPE_CHECKING:
    from pikaserve.model.q4_int8_weights import Q4Int8Weight

SOURCE = Path(__file__).with_name("decode_layer.c")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Q4WeightArgs(ctypes.Structure):
    _fields_ = [("codes", _P), ("scales", _P), ("mins", _P), ("n", _I)]


class LayerArgs(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", Q4WeightArgs),
                ("o", Q4WeightArgs), ("gate_up", Q4WeightArgs)]


class StepArgs(ctypes.Structure):
    """A step's arguments; `tensors` keeps alive what they point into (scratch included)."""

    tensors: list[torch.Tensor]
    _fields_ = [
        ("norm", _P), ("rotary", _P), ("attention", _P), ("matmul", _P),
        ("rows", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I),
        ("block_size", _I), ("eps", _F), ("scale", _F),
        ("cos", _P), ("sin", _P), ("cos_stride", _I), ("sin_stride", _I),
        ("slots", _P), ("block_tables", _P), ("table_stride", _I),
        ("row_tokens", _P), ("row_seqs", _P), ("row_lens", _P),
        ("threads", _I), ("norm_threads", _I), ("rotary_threads", _I),
        ("attention_parallel", _I),
        ("mid", _P), ("h", _P), ("qkv", _P), ("qk", _P), ("attn", _P), ("o", _P),
    ]


class DecodeLayerKernel:
    """The compiled front, with the functions it strings together."""

    def __init__(self, library: ctypes.CDLL, path: Path, kernels: CpuKernels,
                 q4: Q4Matmul) -> None:
        self.path = path
        self._fn = library.decode_layer_front
        self._fn.argtypes, self._fn.restype = [_P, _P, _P, _P, _P, _P, _P, _P], None
        self._functions = (kernels.address("rms_norm", torch.float32),
                           kernels.address("rotary", torch.float32),
                           kernels.address("attention_rows", torch.float32), q4.address())

    def layer(self, input_norm: torch.Tensor, post_norm: torch.Tensor, qkv: Q4Int8Weight,
              o: Q4Int8Weight, gate_up: Q4Int8Weight) -> LayerArgs:
        """A layer's fixed arguments: its norms' weights (float32, contiguous) and its three
        matrices (the caller keeps them alive)."""
        return LayerArgs(input_norm.data_ptr(), post_norm.data_ptr(), _q4(qkv), _q4(o),
                         _q4(gate_up))

    def step(self, rows: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
             eps: float, scale: float, cos: torch.Tensor, sin: torch.Tensor,
             slots: torch.Tensor, paged: PagedRows, block_size: int) -> StepArgs:
        """A step's arguments: `cos`/`sin` [rows, head_dim] (rows may be strided), the KV
        `slots` [rows] and `paged` as the unfused layer gets them."""
        threads = torch.get_num_threads()
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        scratch = [torch.empty((rows, n), dtype=torch.float32) for n in
                   (hidden, hidden, q_size + 2 * kv_size, q_size + kv_size, q_size, hidden)]
        args = StepArgs(
            *self._functions, rows, hidden, heads, kv_heads, head_dim, block_size, eps, scale,
            cos.data_ptr(), sin.data_ptr(), cos.stride(0), sin.stride(0), slots.data_ptr(),
            paged.block_tables.data_ptr(), paged.block_tables.stride(0),
            paged.row_tokens.data_ptr(), paged.row_seqs.data_ptr(), paged.row_lens.data_ptr(),
            threads, cpu_native.threads_for(rows * hidden),
            cpu_native.threads_for(rows * (q_size + kv_size)),
            int(cpu_native.rows_in_parallel(rows, kv_heads, paged.longest)),
            *(t.data_ptr() for t in scratch))
        args.tensors = [cos, sin, slots, paged.block_tables, paged.row_tokens, paged.row_seqs,
                        paged.row_lens, *scratch]
        return args

    def front(self, layer: LayerArgs, step: StepArgs, x: torch.Tensor,
              pending: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
              gate_up_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, pending) [rows, hidden] contiguous -> (the residual stream after attention,
        the gate/up projection of its norm)."""
        x_out = torch.empty(x.shape, dtype=torch.float32)
        gate_up = torch.empty((x.shape[0], gate_up_size), dtype=torch.float32)
        self._fn(ctypes.addressof(layer), ctypes.addressof(step), x.data_ptr(),
                 None if pending is None else pending.data_ptr(), k_cache.data_ptr(),
                 v_cache.data_ptr(), x_out.data_ptr(), gate_up.data_ptr())
        return x_out, gate_up


def _q4(w: Q4Int8Weight) -> Q4WeightArgs:
    return Q4WeightArgs(w.codes.data_ptr(), w.scales.data_ptr(), w.minimums.data_ptr(),
                        w.codes.shape[0] * TILE)


def load(kernels: CpuKernels, q4: Q4Matmul) -> DecodeLayerKernel | None:
    """The compiled front, or None where it does not build here (logged)."""
    built = cpu_native.open_library(SOURCE, None, "decode steps call each kernel from Python")
    return None if built is None else DecodeLayerKernel(*built, kernels, q4)
