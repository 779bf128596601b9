"""The engine's host time per Pika request under load, this tree against an earlier commit.

On a GPU the model pass of a Pika step is tiny, and the engine is host-bound: the H200 check
(docs/gpu.md) served ~540 Pika req/s offline with the GPU mostly idle. This measures that
host share on any machine: a closed loop of N clients sends distinct Pika turns (chat template,
tokenization, JSON-schema grammar, scheduling, sampling, detokenization, all as the server's
engine thread does them), and the model pass (ModelRunner.forward) is timed and subtracted.
The model is SmolLM2-135M's tokenizer and config with one layer of random weights, so the pass
is short and the run quick; host work does not depend on the weights.

Each tree runs in its own process (PYTHONPATH), rounds alternating, on the same model folder.

    python benchmarks/host_overhead.py --against 2980496 [--clients 64,256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "host_overhead.json"


def build_model(out: Path) -> None:
    """SmolLM2-135M's tokenizer and config (from the embedded GGUF), one layer, random weights."""
    import torch
    import transformers

    from pikaserve.model.gguf_loader import load_gguf_tokenizer
    from pikaserve.model.loader import default_model_path, load_checkpoint

    path = default_model_path()
    load_gguf_tokenizer(path).save_pretrained(out)
    checkpoint, _ = load_checkpoint(path, torch.float32)
    config = {k: v for k, v in checkpoint.config.items()
              if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    config["num_hidden_layers"] = 1
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(out)


def worker(model: str, clients: int, requests: int) -> dict:
    """One closed-loop run in this process's pikaserve; host ms per request and per step."""
    import pikaserve
    from pikaserve.bench.workloads import pika_workload
    from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
    from pikaserve.llm import LLM
    from pikaserve.structured.compiler import build_constraint

    workload = pika_workload()
    turns = [list(r.messages) for r in workload.requests]
    schema = workload.requests[0].response_format["json_schema"]["schema"]
    params = SamplingParams(max_tokens=64, temperature=0,
                            structured_outputs=StructuredOutputsParams(json=schema))
    llm = LLM(model, dtype="float32", max_num_seqs=clients, kv_cache_memory_bytes=1 << 30)
    llm.generate(turns[-4:], params)  # the system prompt into the prefix cache
    engine = llm.engine
    forward_s = 0.0
    forward = engine.runner.forward

    def timed_forward(step):
        nonlocal forward_s
        start = time.perf_counter()
        result = forward(step)
        forward_s += time.perf_counter() - start
        return result

    engine.runner.forward = timed_forward
    # each turn once per engine with its own suffix: no prompt is ever wholly cached
    pending = iter(range(requests))
    finished = steps = 0

    def submit() -> None:
        i = next(pending, None)
        if i is not None:
            messages = [*turns[i % len(turns)][:-1], {
                "role": "user", "content": f"{turns[i % len(turns)][-1]['content']} ({i})"}]
            prompt = llm.prompt_token_ids(messages)
            constraint = build_constraint(params.structured_outputs, llm.tokenizer)
            engine.add_request(f"r{i}", prompt, params, constraint)

    begin = time.perf_counter()
    for _ in range(clients):
        submit()
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            if out.finished:
                finished += 1
                submit()
    host_s = time.perf_counter() - begin - forward_s
    return {"pikaserve": str(Path(pikaserve.__file__).parents[1]), "requests": finished,
            "steps": steps, "host_ms_per_request": host_s * 1e3 / finished,
            "host_ms_per_step": host_s * 1e3 / steps}


def run_tree(tree: Path, model: Path, clients: int, requests: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(model), "--clients", str(clients),
         "--requests", str(requests)], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["pikaserve"]).resolve() != tree.resolve():
        raise RuntimeError(f"ran {result['pikaserve']}, not {tree}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", help="the git ref to compare with (a worktree is made)")
    ap.add_argument("--clients", default="64,256")
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, levels[0], args.requests)))
        return 0
    from pikaserve.machine import describe_machine

    with tempfile.TemporaryDirectory(prefix="host_overhead_") as tmp:
        model, baseline = Path(tmp) / "model", Path(tmp) / "baseline"
        build_model(model)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline),
                        args.against], check=True, capture_output=True)
        trees = {"this tree": ROOT, args.against: baseline}
        try:
            runs: dict = {name: {c: [] for c in levels} for name in trees}
            for _ in range(args.rounds):
                for clients in levels:
                    for name, tree in trees.items():
                        r = run_tree(tree, model, clients, clients * args.requests_per_client)
                        runs[name][clients].append(r["host_ms_per_request"])
                        print(f"{name:>10} {clients:>4} clients: "
                              f"{r['host_ms_per_request']:.3f} host ms/request", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(baseline)], check=False)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    summary = {}
    for clients in levels:
        now = statistics.median(runs["this tree"][clients])
        before = statistics.median(runs[args.against][clients])
        summary[f"{clients} clients"] = {
            "host_ms_per_request": {"this tree": now, args.against: before},
            "before_over_now": before / now, "runs": {n: runs[n][clients] for n in trees}}
        print(f"{clients} clients: {before:.3f} -> {now:.3f} host ms/request "
              f"({before / now:.2f}x less)")
    args.out.write_text(json.dumps({
        "benchmark": "host_overhead", "what": __doc__.split("\n\n")[0],
        "machine": describe_machine(), "commit": commit, "against": args.against,
        "model": "SmolLM2-135M tokenizer and config, 1 layer, random weights, float32",
        "results": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
