"""Is oneDNN's int8 matmul a lever on AVX2 CPUs? SmolLM2-135M's matmul shapes, float32 vs int8.

Per shape and row count, one process per CPU class (native, and capped to AVX2 with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, as in benchmarks/cpu_classes.py):
  float32  F.linear's result from weights reordered once into oneDNN's layout (what pikaserve
           runs on an AVX2 CPU today)
  int8     weights quantized per output channel, activations per tensor on the fly (u8, zero
           point 128), oneDNN's qlinear; the activation quantization is counted in its time
It reports the time per call and the int8 result's error (max |int8 - float32| / max |float32|).
Results: benchmarks/results/cpu_int8_matmul.json.

    python benchmarks/cpu_int8_matmul.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pikaserve.machine import AVX2_KERNEL_CAPS

OUT = Path(__file__).parent / "results" / "cpu_int8_matmul.json"
CLASSES = {"native": {}, "avx2": AVX2_KERNEL_CAPS}
# (out, in): fused qkv, o_proj, fused gate_up, down_proj, LM head
SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
ROWS = (1, 8, 40)


def per_call_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def measure() -> dict:
    import torch

    from pikaserve.machine import describe_machine
    from pikaserve.model import onednn_weights

    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        plain = onednn_weights.reorder(w)
        w_scale = w.abs().amax(1) / 127
        qw = torch.clamp((w / w_scale[:, None]).round(), -127, 127).to(torch.int8)
        w_zero = torch.zeros(n, dtype=torch.int64)
        for m in ROWS:
            x = torch.randn(m, k)
            packed = torch.ops.onednn.qlinear_prepack(qw, [m, k])

            def int8():
                scale = x.abs().amax() / 127
                qx = torch.clamp((x / scale).round() + 128, 0, 255).to(torch.uint8)
                return torch.ops.onednn.qlinear_pointwise(
                    qx, float(scale), 128, packed, w_scale, w_zero, None, 1.0, 0,
                    torch.float32, "none", [], "")

            ref = onednn_weights.linear(x, plain, None)
            reps = 20 if n > 10000 else 200
            rows.append({
                "shape": [n, k], "rows": m,
                "float32_us": per_call_us(lambda: onednn_weights.linear(x, plain, None), reps),
                "int8_us": per_call_us(int8, reps),
                "int8_error": ((int8() - ref).abs().max() / ref.abs().max()).item(),
            })
    return {"machine": describe_machine(), "results": rows}


def main() -> int:
    if "--child" in sys.argv:
        print(json.dumps(measure()))
        return 0
    out = {}
    for name, env in CLASSES.items():
        run = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        out[name] = {"env": env, **json.loads(run.stdout.strip().splitlines()[-1])}
        for r in out[name]["results"]:
            print(f"{name:6s} {r['shape'][0]:5d}x{r['shape'][1]:<4d} rows {r['rows']:2d}: "
                  f"float32 {r['float32_us']:7.1f} us  int8 {r['int8_us']:7.1f} us "
                  f"(x{r['float32_us'] / r['int8_us']:.2f})  int8 error {r['int8_error']:.3f}")
    OUT.write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
