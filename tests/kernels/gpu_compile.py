"""Compiles recorded Triton launches for real GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs our kernels on a CPU, but it accepts programs that
Triton's CUDA compiler rejects: a dot under 16 rows, a cast the target lacks, a type clash in
a loop. `record_launches()` notes every launch the interpreter runs; `compile_for_gpus()` then
compiles each distinct one to a cubin with Triton's own CUDA backend and ptxas (both ship with
the triton wheel), in a subprocess without TRITON_INTERPRET, exactly as a GPU would at first
launch. Only the launch itself needs the GPU.

    python tests/kernels/gpu_compile.py RECORDS.json   # the subprocess side
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

# torch dtype name -> Triton's pointer element type
ELEMENT_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8e4nv",
                 "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}
# (name, compute capability): an A100 and an H100/H200
TARGETS = (("sm80", 80), ("sm90", 90))


def launch_record(fn, args: tuple, kwargs: dict) -> dict:
    """What compiling this launch needs: the kernel's import path, each parameter's Triton
    type (or its constexpr value), and the launch options."""
    import torch

    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip((p.name for p in params), args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    signature, constexprs = {}, {}
    for p in params:
        value = values.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + ELEMENT_TYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type {p.name}={value!r}")
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "options": options}


@contextlib.contextmanager
def record_launches():
    """Yields a list that fills with launch_record()s of every kernel the interpreter runs."""
    from triton.runtime.interpreter import InterpretedFunction

    records: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        records.append(launch_record(self.fn, args, dict(kwargs)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield records
    finally:
        InterpretedFunction.run = original


def distinct(records: list[dict]) -> list[dict]:
    seen = {json.dumps(r, sort_keys=True): r for r in records}
    return list(seen.values())


def compile_for_gpus(records: list[dict], workdir: Path) -> list[str]:
    """Compiles each record for every target in a clean subprocess; returns the failures."""
    path = workdir / "launches.json"
    path.write_text(json.dumps(distinct(records)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(workdir / "triton_cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True,
                          text=True, timeout=1200)
    if done.returncode != 0:
        return [f"compiler process failed:\n{done.stdout}\n{done.stderr}"]
    return json.loads(done.stdout.strip().splitlines()[-1])


def needs_fp8_hardware(record: dict) -> bool:
    return any("fp8" in t for t in record["signature"].values())


def _compile_all(path: Path) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for record in json.loads(path.read_text()):
        kernel = getattr(importlib.import_module(record["module"]), record["kernel"])
        for name, capability in TARGETS:
            if capability < 89 and needs_fp8_hardware(record):
                continue  # fp8 KV caches are refused below compute capability 8.9
            source = ASTSource(kernel, record["signature"], record["constexprs"])
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                          options=record["options"])
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as e:  # noqa: BLE001  # every failure is reported, not the first
                failures.append(f"{record['kernel']} on {name} {record['constexprs']} "
                                f"{record['signature']}: {type(e).__name__}: {e}")
    return failures


if __name__ == "__main__":
    print(json.dumps(_compile_all(Path(sys.argv[1]))))
