"""The CPU's fused kernels (cpu_kernels.c): built with the machine's C compiler on first use.

A CPU decode step of a small model is mostly eager-op overhead around its matmuls (~35 ops per
layer at a few microseconds each, docs/performance.md); these kernels do RMSNorm (+ residual),
rope and paged attention of query rows in one call each. The model calls them through the
same four functions as kernels/fused.py (Triton, CUDA; SiLU * up stays PyTorch's here); the
torch attention backend calls `attention_rows` for short sequences and `attention_chunks`
for prefill chunks (2-3x faster than SDPA there).

The source is compiled once per machine with `cc -O3` for the instruction sets torch's own
kernels use (so ATEN_CPU_CAPABILITY=avx2 gets AVX2 code here too) and cached under
~/.cache/pikaserve/kernels (PIKASERVE_CACHE_DIR moves it); a new build removes the same
source's builds unused for 30 days. Without a compiler, or when the build fails,
`load("auto")` returns None and everything runs in plain PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pikaserve.config import ConfigError
from pikaserve.machine import cpu_model, cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Attention rows run on several threads (OpenMP) from this many (row, KV head, key) triples,
# the small ops from this many elements; below, one thread is faster than waking the others.
# Measured on two cores: RMSNorm + residual over 576 columns 8.1 vs 7.1 us at 32 rows (one
# thread vs two), even at 8; rope of 12 heads x 64 even at 16 rows, 6.3 vs 5.8 us at 32.
PARALLEL_WORK = 4096
PARALLEL_ELEMENTS = 16384
STALE_DAYS = 30  # a build unused this long is removed when the same source is built anew

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_P, _I, _P, _I, _P, _P, _P, _I, _I, _F, _I],
    "rotary": [_P, _I, _I, _P, _I, _P, _I, _P, _I, _I, _I, _I],
    "attention_rows": [_P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _I, _I],
    "attention_chunks": [_P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _I],
}

_RETURNS_STATUS = {"attention_chunks"}  # 0, or 1 when its buffers could not be allocated


class CpuKernels:
    """Typed wrappers around the compiled library, for float32 and bfloat16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, suffix in DTYPES.items():
                fn = getattr(library, f"{name}_{suffix}")
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int64 if name in _RETURNS_STATUS else None
                self._fns[name, dtype] = fn
        library.max_dim.restype = library.dim_multiple.restype = ctypes.c_int64
        self.max_dim, self.dim_multiple = library.max_dim(), library.dim_multiple()

    def address(self, name: str, dtype: torch.dtype) -> int:
        """The entry point of a kernel (e.g. "rms_norm") for `dtype`, for C callers
        (kernels/decode_layer.py)."""
        return ctypes.cast(self._fns[name, dtype], ctypes.c_void_p).value or 0

    def supports(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether a model of this dtype and attention shape can run on these kernels."""
        return (dtype in DTYPES and num_heads % num_kv_heads == 0
                and head_dim <= self.max_dim and head_dim % self.dim_multiple == 0)

    # The four functions of kernels/fused.py, same arguments and results.

    # Rows (and heads) may be strided; the last dimension must be contiguous (_packed).

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = _packed(x), _packed(weight)
        out = torch.empty(x.shape, dtype=x.dtype)
        rows, width = x.shape
        self._fns["rms_norm", x.dtype](
            x.data_ptr(), x.stride(0), None, 0, weight.data_ptr(), None, out.data_ptr(),
            rows, width, eps, threads_for(out.numel()))
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual, weight = _packed(x), _packed(residual), _packed(weight)
        summed = torch.empty(x.shape, dtype=x.dtype)
        out = torch.empty_like(summed)
        rows, width = x.shape
        self._fns["rms_norm", x.dtype](
            x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
            weight.data_ptr(), summed.data_ptr(), out.data_ptr(), rows, width, eps,
            threads_for(out.numel()))
        return summed, out

    def rotary(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qk, cos, sin = _packed(qk), _packed(cos), _packed(sin)
        tokens, heads, dim = qk.shape
        out = torch.empty((tokens, heads, dim), dtype=qk.dtype)
        self._fns["rotary", qk.dtype](
            qk.data_ptr(), qk.stride(0), qk.stride(1), cos.data_ptr(), cos.stride(0),
            sin.data_ptr(), sin.stride(0), out.data_ptr(), tokens, heads, dim,
            threads_for(out.numel()))
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """PyTorch's own: its vectorised SiLU was as fast as a C loop at one row and faster in
        bfloat16 (2.7 vs 5.0 us; 21 vs 51 us at 50 rows on two threads). In place, over the
        gate half of `gate_up` (the result is that half, rows strided): a 16-client Pika
        prefill's ~1,200 rows made two fresh 7.5 MB tensors a layer, whose page faults cost
        more than the arithmetic (5.2 against 2.1 ms on Zen 3). Same bits as out of place."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)

    def attention_rows(
        self,
        q: torch.Tensor,  # [T, Hq, D], rows and heads may be strided, D contiguous
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [S, max_blocks] int64
        row_tokens: torch.Tensor,  # [R] int64: the token (row of q and out) each row is
        row_seqs: torch.Tensor,  # [R] int64: its sequence (row of block_tables)
        row_lens: torch.Tensor,  # [R] int64: the keys it sees
        longest: int,  # max(row_lens)
        scale: float,
        out: torch.Tensor,  # [T, Hq, D] contiguous; rows not in row_tokens are left alone
    ) -> None:
        q = _packed(q)
        _, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        rows = row_tokens.shape[0]
        threads = torch.get_num_threads()
        parallel = rows_in_parallel(rows, kv_heads, longest)
        self._fns["attention_rows", q.dtype](
            q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), row_tokens.data_ptr(),
            row_seqs.data_ptr(), row_lens.data_ptr(), rows, heads, kv_heads, dim, block_size,
            scale, out.data_ptr(), threads, int(parallel))

    def attention_chunks(
        self,
        q: torch.Tensor,  # [T, Hq, D], rows and heads may be strided, D contiguous
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [C, max_blocks] int64: chunk c's sequence in row c
        starts: torch.Tensor,  # [C] int64: the chunk's first token (row of q and out)
        lens: torch.Tensor,  # [C] int64: its new tokens
        context_lens: torch.Tensor,  # [C] int64: its sequence's keys, the new ones included
        scale: float,
        out: torch.Tensor,  # [T, Hq, D] contiguous; rows of no chunk are left alone
    ) -> None:
        """Causal attention of prefill chunks: the chunk's token i sees the first
        context_len - len + i + 1 keys of its sequence."""
        q = _packed(q)
        _, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        failed = self._fns["attention_chunks", q.dtype](
            q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), starts.data_ptr(), lens.data_ptr(),
            context_lens.data_ptr(), starts.shape[0], heads, kv_heads, dim, block_size, scale,
            out.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError("attention_chunks: no memory for the packed keys and values")


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last dimension is strided (the kernels step through it
    one element at a time)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_in_parallel(rows: int, kv_heads: int, longest: int) -> bool:
    """Whether attention of so many rows runs on several threads (attention_rows)."""
    return torch.get_num_threads() > 1 and rows * kv_heads * longest >= PARALLEL_WORK


def threads_for(elements: int) -> int:
    """Threads for a small op over so many elements: torch's intra-op count, or 1."""
    return torch.get_num_threads() if elements >= PARALLEL_ELEMENTS else 1


def load(mode: str = "auto") -> CpuKernels | None:
    """The compiled kernels. mode "torch": None (plain PyTorch); "auto": None when they cannot
    be built here (logged); "native": a ConfigError then."""
    if mode == "torch":
        return None
    built = open_library(SOURCE, "cpu_kernels 'native'" if mode == "native" else None,
                         "running plain PyTorch ops")
    return None if built is None else CpuKernels(*built)


def open_library(source_path: Path, required_by: str | None,
                 fallback: str) -> tuple[ctypes.CDLL, Path] | None:
    """The built library of a C file of this folder and its path. Where it does not build:
    a ConfigError naming `required_by` (the setting that demands it), else None, logged with
    what runs instead (`fallback`)."""
    try:
        path = build(source_path)
        return ctypes.CDLL(str(path)), path
    except (OSError, subprocess.SubprocessError) as e:
        if required_by:
            raise ConfigError(f"{required_by}: could not build {source_path.name}: {e}") from e
        logger.warning("%s not built (%s); %s", source_path.name, e, fallback)
        return None


def build(source_path: Path = SOURCE) -> Path:
    """Compile a C file of this folder (cpu_kernels.c by default) for this machine, or return
    the cached library."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    # no errno and no trapping maths: otherwise exp and float-to-int conversions keep loops
    # scalar (AVX2); results are the same
    flags = ["-O3", *_isa_flags(), "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-std=gnu11", "-shared", "-fPIC"]
    source = source_path.read_bytes()
    # the CPU's model and flags too: a cache in a shared home must not hand one CPU's
    # -march=native build to another
    machine = [compiler, *flags, cpu_model(), *cpu_flags()]
    key = hashlib.sha256(source + " ".join(machine).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PIKASERVE_CACHE_DIR", Path.home() / ".cache" / "pikaserve"))
    path = cache / "kernels" / f"{source_path.stem}-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # concurrent builds never mix
    result = subprocess.run([compiler, *flags, str(source_path), "-o", str(partial), "-lm"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if "error" in line] or lines[-3:]
        raise OSError(f"{compiler} failed on {source_path.name}: {' / '.join(errors[:3])}")
    os.replace(partial, path)
    logger.info("built %s: %s", source_path.name, path)
    _prune_stale(path.parent, source_path.stem, keep=path)
    return path


def _prune_stale(folder: Path, stem: str, keep: Path) -> None:
    """Removes the source's other builds unused for STALE_DAYS: each change of the source,
    the compiler or the CPU leaves one behind. Used means read (loading reads the file: its
    access time moves, at least daily under relatime) or written."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in folder.glob(f"{stem}-*.so"):
        try:
            info = old.stat()
            if old != keep and max(info.st_atime, info.st_mtime) < cutoff:
                old.unlink()
        except OSError:
            pass  # gone already, or not ours to remove


def _isa_flags() -> list[str]:
    """Code for the instruction sets torch's kernels use: the CPU's own, unless capped by
    ATEN_CPU_CAPABILITY (then x86-64-v3 for AVX2, the baseline for default)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["-mcpu=native"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-march=native"]
    if capability == "AVX2":
        return ["-march=x86-64-v3", "-mtune=native"]
    return ["-march=x86-64", "-mtune=native"]
