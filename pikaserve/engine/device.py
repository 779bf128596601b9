"""Device, dtype and thread choices for the machine we run on."""

from __future__ import annotations

import functools
import logging

import torch

from pikaserve.config import ConfigError, EngineConfig, default_num_threads
from pikaserve.machine import cpu_flags, kernel_isas, onednn_isa_cap

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it still runs bfloat16 matmuls natively
_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
    "AVX10_2_512_AMX_2", "ALL",
})


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX, and oneDNN not capped below them: oneDNN then runs bf16 matmuls
    natively (measured ~3-10x fp32 at batch). Capped (ONEDNN_MAX_CPU_ISA=AVX2), it refuses
    them as it would on an AVX2 CPU, so the engine chooses as it would there."""
    flags = set(cpu_flags())
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and (onednn_isa_cap() or "ALL") in _BF16_ISAS


def describe_cpu(dtype: torch.dtype, int4_rows: int, int8_rows: int, q4_int8_layers: int,
                 q8_head: bool, q4_vnni: bool, q4_rows: int | None, native: bool,
                 decode_in_c: bool = False) -> str:
    """One line for the start-up log: what the CPU has and which kernels the engine chose."""
    isas = kernel_isas()
    matmul = "bfloat16, native" if dtype == torch.bfloat16 and cpu_has_fast_bf16() else str(dtype).removeprefix("torch.")
    small = ""
    if int4_rows:
        small = f"; Q4 GGUF weights used as 4-bit for steps of <= {int4_rows} rows"
    if q4_int8_layers:
        head = " and the LM head's on int8 codes" if q8_head else ""
        small = (f"; {q4_int8_layers} of them instead on the Q4 GGUF codes{head} x int8 "
                 f"activations (integer kernels, {'VNNI' if q4_vnni else 'AVX2'}), "
                 f"{'every step' if q4_rows is None else f'steps of <= {q4_rows} rows'}")
    if int8_rows:
        which = "the other weights" if q4_int8_layers or int4_rows else "the weights"
        small += f"; int8 copies of {which} (bfloat16 activations) for steps of <= {int8_rows} rows"
    small_ops = ("norms, rope and attention: compiled C kernels" if native
                 else "norms, rope and attention: PyTorch ops (SDPA for prefill chunks)")
    if decode_in_c:
        small_ops += ", strung together in one call per layer for decode steps"
    return (f"CPU flags {' '.join(cpu_flags()) or 'none of note'}; torch kernels {isas['torch']}, "
            f"oneDNN cap {isas['onednn_cap']}; matmuls {matmul} (oneDNN, weights reordered once){small}"
            f"; {small_ops}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (fp16 on pre-Ampere) and on CPUs with native bf16, else fp32.

    A CPU asked for float16 gets bfloat16 (or float32) instead: CPUs have no fast fp16 matmul,
    and both keep the same model behaviour within rounding.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    dtype = _DTYPE_NAMES[name]
    if device.type == "cpu" and dtype is torch.float16:
        served = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        logger.warning(
            "dtype float16 has no fast kernels on this CPU; running in %s instead",
            str(served).removeprefix("torch."),
        )
        return served
    return dtype


# Capped to AVX2 here: 1.7x float32 at one row, 1.2x at two, slower at 3+.
AUTO_INT8_ROWS = 2


def resolve_int8_rows(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """How many rows a pass may have to use int8 weights (EngineConfig.int8_max_rows)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return 0
    if config.int8_max_rows is not None:
        return config.int8_max_rows
    # Not by default on bfloat16, though its LM head is faster in int8 (0.74 against 1.06 ms
    # at one row): a step's row count then picks the head's arithmetic, and greedy outputs
    # with n-gram speculation (5-row steps) differed from those without (1-row steps).
    return AUTO_INT8_ROWS if config.dtype == "auto" and dtype == torch.float32 else 0


def resolve_q4_int8(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> str:
    """Whether float32 CPU matmuls run on 4-bit codes x int8 activations
    (EngineConfig.q4_int8_matmul): "on", "auto" (where the kernel builds) or "off"."""
    mode = config.q4_int8_matmul
    if device.type == "cpu" and dtype == torch.float32:
        return mode if mode == "on" or config.dtype == "auto" else "off"
    if mode == "on":
        raise ConfigError(f"q4_int8_matmul 'on' runs float32 models on a CPU; this engine "
                          f"runs {str(dtype).removeprefix('torch.')} on {device.type}")
    return "off"


def resolve_kv_cache_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None for auto (the model dtype). fp8: e4m3, on CUDA GPUs that convert to it natively
    (compute capability 8.9+: Ada, Hopper and later)."""
    if name == "auto":
        return None
    if device.type != "cuda":
        raise ConfigError(f"an fp8 KV cache needs a CUDA GPU; this engine runs on {device.type}")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(
            f"an fp8 KV cache needs compute capability 8.9+; {torch.cuda.get_device_name(device)} "
            f"has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )
    return torch.float8_e4m3fn


def configure_threads(config: EngineConfig, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads or default_num_threads())
