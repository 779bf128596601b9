"""pikaserve on this CPU as it is, and capped to AVX2 (as an AVX2-only CPU runs it), side by side.

Each class runs in its own process (the ISA caps must be set before torch starts):
  native        the CPU's own instruction sets
  avx2          ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: torch's and oneDNN's kernels
                limited to AVX2, so the engine chooses what an AVX2 CPU gets (float32, the Q4
                GGUF's matmuls on the Q4 x int8 kernel, an int8 LM head for steps of 1-2 rows,
                the C kernels built for AVX2)
  avx2_no_q4    the same with q4_int8_matmul=off (float32 matmuls, int8 copies of every
                weight for steps of 1-2 rows): the integer kernel's worth
  *_torch_ops   native and avx2 with cpu_kernels=torch: the compiled C kernels' worth
Classes run in rounds, in reverse order every other round (the VM drifts); a class's figures
are the median over its rounds.
Measured, through the Python API on the embedded default model, one request at a time:
  - the Pika request (warm system prompt, JSON schema), every turn new to the engine: p50/p90
  - batch-1 decode of a 128-token plain completion: tokens/s
What the caps do not cover: fbgemm (not used here) ignores them, and the memory system stays
this machine's; a real AVX2 machine may differ. Results: benchmarks/results/cpu_classes.json.

    python benchmarks/cpu_classes.py [-n 40] [--rounds 3]
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
# name: (environment, engine arguments)
CLASSES = {
    "native": ({}, {}),
    "native_torch_ops": ({}, {"cpu_kernels": "torch"}),
    "avx2": (AVX2_KERNEL_CAPS, {}),
    "avx2_torch_ops": (AVX2_KERNEL_CAPS, {"cpu_kernels": "torch"}),
    "avx2_no_q4": (AVX2_KERNEL_CAPS, {"q4_int8_matmul": "off"}),
}


def measure(n: int, engine_args: dict) -> dict:
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
    llm = LLM(**engine_args)
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
        "q4_int8_layers": llm.engine.runner.model.q4_int8_layers(),
        "cpu_kernels": llm.engine.runner.model.decoder_layers[0].kernels is not None,
        "pika_ms": {"p50": statistics.median(pika), "p90": q[8], "n": n},
        "decode_tok_per_s": statistics.median(decode),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=40, help="Pika requests per class")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)  # engine arguments
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.n, args.child)))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in CLASSES}
    for r in range(args.rounds):
        for name in list(CLASSES)[:: 1 if r % 2 == 0 else -1]:
            env, engine_args = CLASSES[name]
            run = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(engine_args), "-n", str(args.n)],
                env={**os.environ, **env}, capture_output=True, text=True, check=True)
            got = json.loads(run.stdout.strip().splitlines()[-1])
            runs[name].append(got)
            print(f"round {r} {name:17s} {got['dtype']:9s} Pika p50 {got['pika_ms']['p50']:6.1f} ms"
                  f"  p90 {got['pika_ms']['p90']:6.1f} ms  decode {got['decode_tok_per_s']:5.1f} tok/s")
    results = {}
    for name, (env, engine_args) in CLASSES.items():
        results[name] = {
            "env": env, "engine_args": engine_args, **runs[name][0],
            "pika_ms": {"p50": statistics.median(g["pika_ms"]["p50"] for g in runs[name]),
                        "p90": statistics.median(g["pika_ms"]["p90"] for g in runs[name]),
                        "n": args.n, "rounds": args.rounds},
            "decode_tok_per_s": statistics.median(g["decode_tok_per_s"] for g in runs[name]),
            "rounds": [{"pika_p50_ms": g["pika_ms"]["p50"], "decode_tok_per_s": g["decode_tok_per_s"]}
                       for g in runs[name]],
        }

    def ratio(a: str, b: str) -> dict:
        """a against b: Pika p50 as a fraction of b's (lower is faster), decode speed as a
        multiple of b's."""
        x, y = results[a], results[b]
        return {"pika_p50": x["pika_ms"]["p50"] / y["pika_ms"]["p50"],
                "decode": x["decode_tok_per_s"] / y["decode_tok_per_s"]}

    results["ratios"] = {
        "avx2_vs_native": ratio("avx2", "native"),
        "q4_int8_on_avx2": ratio("avx2", "avx2_no_q4"),
        "c_kernels_on_native": ratio("native", "native_torch_ops"),
        "c_kernels_on_avx2": ratio("avx2", "avx2_torch_ops"),
    }
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
