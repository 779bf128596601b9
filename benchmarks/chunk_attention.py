"""Attention of prefill chunks: the compiled C kernel against SDPA, native and capped to AVX2.

One attention layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, 64 dims, KV blocks of 4
scattered through the cache) on steps of prefill chunks, through the torch attention backend
both ways: with the compiled CPU kernels (`attention_chunks`: one call per step) and without
(one SDPA call per chunk over its gathered keys). The steps are Pika's: a turn's 62 new
tokens over the 328 cached system-prompt tokens, alone and 16 at once (16 clients: their
block tables start with the same 82 blocks, as prefix caching hands them out), plus a fresh
512-token prompt. Each class runs in its own process (the ISA caps must be set before
torch starts): native in the model dtype `dtype=auto` picks here (bfloat16 where the CPU has
it), avx2 in float32. Times are the median of 15 repeats of 20 calls, the two paths
alternating. Results: benchmarks/results/chunk_attention.json.

    python benchmarks/chunk_attention.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pikaserve.machine import AVX2_KERNEL_CAPS

OUT = Path(__file__).parent / "results" / "chunk_attention.json"
STEPS = {  # name: the step's chunks as (new tokens, keys after the step); cached keys shared
    "pika_1_chunk": [(62, 390)],
    "pika_16_chunks": [(62, 390)] * 16,
    "fresh_512": [(512, 512)],
}
HEADS, KV_HEADS, DIM, BLOCK_SIZE = 9, 3, 64, 4


def step(chunks: list[tuple[int, int]], dtype):
    """A step of these chunks, blocks in random order, the full blocks of their cached keys
    shared (one prompt prefix): its layout, q, k, v and two caches."""
    import numpy as np
    import torch

    from pikaserve.attention.layout import LayoutBuilder

    num_blocks = sum(-(-ctx // BLOCK_SIZE) for _, ctx in chunks)
    free = list(np.random.default_rng(0).permutation(num_blocks))
    prefix = [free.pop() for _ in range(min(ctx - n for n, ctx in chunks) // BLOCK_SIZE)]
    builder = LayoutBuilder(BLOCK_SIZE)
    for n, ctx in chunks:
        own = -(-ctx // BLOCK_SIZE) - len(prefix)
        builder.add(prefix + [free.pop() for _ in range(own)], ctx - n, n)
    layout = builder.build()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.num_tokens, h, DIM, generator=g).to(dtype)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    caches = [torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, DIM, generator=g).to(dtype)
              for _ in range(2)]
    return layout, q, k, v, caches


def measure() -> dict:
    """Runs in the child process: this class's times."""
    import torch

    from pikaserve.attention.torch_backend import TorchBackend
    from pikaserve.engine.device import resolve_dtype
    from pikaserve.kernels.cpu_native import load
    from pikaserve.machine import describe_machine

    dtype = resolve_dtype("auto", torch.device("cpu"))
    backends = {"c_kernel": TorchBackend(load("native")), "sdpa": TorchBackend()}
    results = {"machine": describe_machine(), "dtype": str(dtype).removeprefix("torch.")}
    for name, chunks in STEPS.items():
        layout, q, k, v, caches = step(chunks, dtype)
        calls = {}
        for path, backend in backends.items():
            layer = backend.layer(HEADS, KV_HEADS, DIM)
            meta = backend.metadata(layout, torch.device("cpu"), dtype)
            calls[path] = lambda layer=layer, meta=meta: layer.forward(q, k, v, *caches, meta)
        times: dict[str, list[float]] = {path: [] for path in calls}
        for _ in range(15):
            for path, call in calls.items():
                call()
                start = time.perf_counter()
                for _ in range(20):
                    call()
                times[path].append((time.perf_counter() - start) / 20 * 1e3)
        ms = {path: statistics.median(t) for path, t in times.items()}
        results[name] = {"chunks": chunks, "ms": ms, "speedup": ms["sdpa"] / ms["c_kernel"]}
    return results


def main() -> int:
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        return 0
    results = {}
    for cls, env in (("native", {}), ("avx2", AVX2_KERNEL_CAPS)):
        run = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        results[cls] = json.loads(run.stdout.strip().splitlines()[-1])
        for name in STEPS:
            got = results[cls][name]
            print(f"{cls:6s} {results[cls]['dtype']:8s} {name:15s} C kernel "
                  f"{got['ms']['c_kernel']:6.3f} ms  SDPA {got['ms']['sdpa']:6.3f} ms  "
                  f"{got['speedup']:.2f}x")
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
