"""Describes the machine and code version that produced a benchmark figure."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU's vector extensions that decide which kernels are fast (AVX2 vs AVX512-BF16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


# Caps that make torch's and oneDNN's kernels those of an AVX2 CPU (set before torch starts)
AVX2_KERNEL_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def kernel_isas() -> dict[str, str]:
    """The instruction sets torch's and oneDNN's CPU kernels may use: the CPU's, unless capped
    by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA (e.g. to run an AVX512 machine as an AVX2 one)."""
    import torch

    return {
        "torch": torch.backends.cpu.get_cpu_capability(),
        "onednn_cap": onednn_isa_cap() or "none",
    }


def onednn_isa_cap() -> str | None:
    """ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA), upper-cased; None when unset."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.upper() if cap else None


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def describe_machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["kernel_isas"] = kernel_isas()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info
