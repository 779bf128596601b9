"""pikaserve on this CPU as it is, and capped to AVX2 (as an AVX2-only CPU runs it), side by side.

Each class runs in its own process (the ISA caps must be set before torch starts):
  native        the CPU's own instruction sets
  avx2          ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: torch's and oneDNN's kernels
                limited to AVX2, so the engine chooses what an AVX2 CPU gets (float32, int8
                weights for steps of 1-2 rows, no 4-bit path)
  avx2_no_int8  the same without the int8 weights (int8_max_rows=0): the lever's worth
Measured, through the Python API on the embedded default model, one request at a time:
  - the Pika request (warm system prompt, JSON schema), every turn new to the engine: p50/p90
  - batch-1 decode of a 128-token plain completion: tokens/s
What the caps do not cover: fbgemm (not used here) ignores them, and the memory system stays
this machine's; a real AVX2 machine may differ. Results: benchmarks/results/cpu_classes.json.

    python benchmarks/cpu_classes.py [-n 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pikaserve.machine import AVX2_KERNEL_CAPS

OUT = Path(__file__).parent / "results" / "cpu_classes.json"
CLASSES = {"native": ({}, None), "avx2": (AVX2_KERNEL_CAPS, None),
           "avx2_no_int8": (AVX2_KERNEL_CAPS, 0)}


def measure(n: int, int8_max_rows: int | None) -> dict:
    """Runs in the child process: this class's figures."""
    from pikaserve.bench.workloads import pika_workload
    from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
    from pikaserve.llm import LLM
    from pikaserve.machine import describe_machine

    workload = pika_workload()
    schema = workload.requests[0].response_format["json_schema"]["schema"]
    params = SamplingParams(max_tokens=50, temperature=0,
                            structured_outputs=StructuredOutputsParams(json=schema))
    turns = [list(r.messages) for r in workload.requests]
    llm = LLM(int8_max_rows=int8_max_rows)
    llm.generate(turns[-3:], params)  # the system prompt into the prefix cache
    pika = []
    for messages in turns[:n]:
        start = time.perf_counter()
        llm.generate([messages], params)
        pika.append((time.perf_counter() - start) * 1e3)
    plain = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    decode = []
    for prompt in ("Once upon a time", "The robot said hello to", "In a small school"):
        out = llm.generate([prompt], plain)[0]
        decode.append((len(out.token_ids) - 1) / (out.e2e - out.ttft))
    q = statistics.quantiles(pika, n=10)
    return {
        "machine": describe_machine(),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "int4_rows": llm.engine.runner.model.int4_rows(),
        "int8_rows": llm.engine.runner.model.int8_rows(),
        "pika_ms": {"p50": statistics.median(pika), "p90": q[8], "n": n},
        "decode_tok_per_s": statistics.median(decode),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=40, help="Pika requests per class")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--int8-max-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.int8_max_rows)))
        return 0
    results = {}
    for name, (env, int8_rows) in CLASSES.items():
        extra = [] if int8_rows is None else ["--int8-max-rows", str(int8_rows)]
        run = subprocess.run([sys.executable, __file__, "--child", "-n", str(args.n), *extra],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
        results[name] = {"env": env, **json.loads(run.stdout.strip().splitlines()[-1])}
        r = results[name]
        print(f"{name:12s} {r['dtype']:9s} Pika p50 {r['pika_ms']['p50']:6.1f} ms  "
              f"p90 {r['pika_ms']['p90']:6.1f} ms  decode {r['decode_tok_per_s']:5.1f} tok/s")
    native, avx2, plain = results["native"], results["avx2"], results["avx2_no_int8"]
    results["ratios"] = {
        "avx2_vs_native": {"pika_p50": avx2["pika_ms"]["p50"] / native["pika_ms"]["p50"],
                           "decode": avx2["decode_tok_per_s"] / native["decode_tok_per_s"]},
        "int8_on_avx2": {"pika_p50": avx2["pika_ms"]["p50"] / plain["pika_ms"]["p50"],
                         "decode": avx2["decode_tok_per_s"] / plain["decode_tok_per_s"]},
    }
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
