"""The GPU benchmark of benchmarks/gpu/check.sh: Pika and plain decoding on one CUDA GPU.

The real SmolLM2-135M GGUF cannot travel to the GPU machine, so the model is SmolLM2-135M's
exact shape (its config and tokenizer, from benchmarks/gpu/smollm2/, made by prepare.sh) with
seeded random weights: every timing is that of the real model, and its answers are
meaningless (only their validity against the schema is checked). Sections, each recorded even
when another fails:

  offline_pika     the Pika request (system prompt warm in the prefix cache, JSON schema,
                   temperature 0) through the Python API, one at a time, eager vs CUDA graphs
  offline_load     the engine alone under 64 and 256 clients (closed loop: a finished request
                   is replaced at once), req/s and latency percentiles, no HTTP in the way;
                   graphs and eager, with how many passes replayed a graph
  decode           batch-1 decode speed of a 128-token plain completion, eager vs graphs
  graph_replay     the GPU time of one captured pass of 1, 8, 64 and 256 tokens alone
  server           the same Pika requests through `pikaserve serve` over HTTP (pikaserve
                   bench), eager vs graphs side by side: 1, 64 and 256 clients
  transformers     Hugging Face generate on the same weights and GPU, for reference

No Pika turn is sent twice to one engine. Results: gpu_bench.json in --out.

    python benchmarks/gpu/bench_gpu.py --out benchmarks/results/gpu
    python benchmarks/gpu/bench_gpu.py --smoke --out /tmp/smoke   # every section, on a CPU,
                                                                   # a few requests each
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pika_vs_llamacpp import free_port, start, wait_ready  # noqa: E402

from pikaserve.bench.workloads import pika_workload  # noqa: E402
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from pikaserve.llm import LLM  # noqa: E402

SHAPE = Path(__file__).parent / "smollm2"
GOALS = {"server_p50_ms_1_client": 5.0, "req_per_s_min": 5000.0, "p99_ms_max": 50.0,
         "decode_tok_per_s_min": 1500.0}
KV_BYTES = 4 << 30  # per engine (~180k tokens): two engines share the GPU at a time


def build_model(out: Path) -> Path:
    """SmolLM2-135M's shape with seeded random weights, as a Hugging Face folder."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    for f in SHAPE.iterdir():
        shutil.copy(f, out / f.name)
    config = transformers.LlamaConfig(**json.loads((SHAPE / "config.json").read_text()))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": statistics.median(ms), "p90": q[89], "p99": q[98], "n": len(ms)}


def pika_requests():
    """(messages, sampling params) per distinct Pika turn, in the bench's order."""
    workload = pika_workload()
    schema = workload.requests[0].response_format["json_schema"]["schema"]
    params = SamplingParams(max_tokens=64, temperature=0,
                            structured_outputs=StructuredOutputsParams(json=schema))
    return [list(r.messages) for r in workload.requests], params


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def offline_pika(model: Path, n: int, device: str) -> dict:
    turns, params = pika_requests()
    warm, measured = turns[-4:], turns[:n]
    result = {}
    for name, eager in (("eager", True), ("graphs", False)):
        llm = LLM(str(model), device=device, enforce_eager=eager, kv_cache_memory_bytes=KV_BYTES)
        llm.generate(warm, params)  # the system prompt into the prefix cache; kernels compiled
        times, tokens = [], []
        for messages in measured:
            start = time.perf_counter()
            out = llm.generate([messages], params)[0]
            times.append((time.perf_counter() - start) * 1e3)
            tokens.append(len(out.token_ids))
        result[name] = {"e2e_ms": percentiles(times), "answer_tokens_mean": statistics.mean(tokens),
                        "passes_per_request": llm.engine.num_forward_passes / (n + len(warm))}
        del llm
        sync(device)
    return result


def offline_load(model: Path, device: str, levels: tuple[int, ...], n: int) -> dict:
    """Each level on a fresh engine (so no turn repeats within one), `n` requests."""
    from pikaserve.structured.compiler import build_constraint

    turns, params = pika_requests()
    result = {}
    # eager too: through the server, graphs gave fewer req/s than eager at 64 clients
    for clients, eager in [(c, e) for c in levels for e in (False, True)]:
        llm = LLM(str(model), device=device, max_num_seqs=max(levels),
                  kv_cache_memory_bytes=KV_BYTES, enforce_eager=eager)
        llm.generate(turns[-8:], params)
        engine = llm.engine
        prompts = iter(llm.prompt_token_ids(m) for m in turns[:n])
        started: dict[str, float] = {}
        latencies: list[float] = []

        def submit() -> None:
            prompt = next(prompts, None)
            if prompt is not None:
                rid = f"load-{len(started)}"
                started[rid] = time.perf_counter()
                constraint = build_constraint(params.structured_outputs, llm.tokenizer)
                engine.add_request(rid, prompt, params, constraint)

        begin = time.perf_counter()
        for _ in range(clients):
            submit()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    latencies.append((time.perf_counter() - started[out.request_id]) * 1e3)
                    submit()
        elapsed = time.perf_counter() - begin
        graphs = engine.runner.graphs
        result[f"{clients} clients{', eager' if eager else ''}"] = {
            "req_per_s": len(latencies) / elapsed, "e2e_ms": percentiles(latencies),
            "passes": engine.num_forward_passes, "graph_passes": graphs.num_steps if graphs else 0}
        llm = engine = None  # free this engine's memory before the next level's
        sync(device)
    return result


def decode(model: Path, device: str) -> dict:
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    result = {}
    for name, eager in (("eager", True), ("graphs", False)):
        llm = LLM(str(model), device=device, enforce_eager=eager, kv_cache_memory_bytes=KV_BYTES)
        llm.generate(["Warm up the kernels."], params)
        runs = []
        for prompt in ("Once upon a time", "The robot said hello to", "In a small school"):
            out = llm.generate([prompt], params)[0]
            runs.append((len(out.token_ids) - 1) / (out.e2e - out.ttft))
        result[name] = {"tok_per_s": statistics.median(runs), "ttft_ms": out.ttft * 1e3}
        del llm
        sync(device)
    return result


def graph_replay(model: Path, device: str) -> dict:
    """The GPU's own time for one captured pass per step size (CUDA events around replays of
    the graph, no host work between them): a step's wall time minus this is the host's share."""
    if device != "cuda":
        return {"skipped": "needs CUDA graphs"}
    llm = LLM(str(model), device=device, max_num_seqs=256, kv_cache_memory_bytes=KV_BYTES)
    graphs = llm.engine.runner.graphs
    rng = random.Random(0)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    result = {}
    for size in (1, 8, 64, 256):
        if size not in graphs.graphs:
            continue
        # a real decode step of `size` rows over ~400-token contexts (Pika's) leaves its
        # inputs in the graph's buffers, so the replays attend over real lengths
        prompts = [[rng.randrange(100, 40000) for _ in range(400)] for _ in range(size)]
        llm.generate(prompts, params)
        graph = graphs.graphs[size]
        for _ in range(10):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            graph.replay()
        end.record()
        end.synchronize()
        result[f"{size} tokens"] = {"ms_per_replay": start.elapsed_time(end) / 100}
    del llm
    sync(device)
    return result


def server(model: Path, out: Path, n: int, device: str, concurrency: str) -> dict:
    from pikaserve.bench.cli import main as bench_main

    urls = {}
    with ExitStack() as stack:
        for name, extra in (("eager", ["--enforce-eager"]), ("graphs", [])):
            port = free_port()
            proc = start([sys.executable, "-m", "pikaserve", "serve", "--model", str(model),
                          "--port", str(port), "--disable-log-requests", "--device", device,
                          "--max-num-seqs", "256", "--kv-cache-memory-bytes", str(KV_BYTES),
                          *extra],
                         out / f"server_{name}.log")
            stack.callback(proc.terminate)
            urls[name] = f"http://127.0.0.1:{port}"
            print(f"server {name} ready in {wait_ready(urls[name], proc, 300):.1f} s", flush=True)
        rc = bench_main([
            "--url", urls["eager"], "--compare", urls["graphs"], "--labels", "eager,graphs",
            "--workload", "pika", "--concurrency", concurrency, "-n", str(n), "--warmup", "8",
            "--no-progress", "--no-plots", "--output-dir", str(out / "server_bench")])
    data = json.loads((out / "server_bench" / "results.json").read_text())
    points = {}
    for point in data["points"]:
        for s in point["servers"]:
            m = s["metrics"]
            points.setdefault(s["label"], {})[point["label"]] = {
                "req_per_s": m["request_throughput"], "e2e_ms": m["e2e"], "ttft_ms": m["ttft"],
                "json_validity": m["json_validity"], "failed": m["failed"]}
    return {"bench_exit": rc, **points}


def transformers_reference(model: Path, device: str, runs: int) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    # cast after loading: older transformers ignore `dtype=`
    hf = transformers.AutoModelForCausalLM.from_pretrained(model).to(device, torch.bfloat16).eval()
    turns, _ = pika_requests()
    result = {}
    ids = tok.apply_chat_template(turns[0], add_generation_prompt=True, return_tensors="pt")
    ids = (ids if isinstance(ids, torch.Tensor) else ids["input_ids"]).to(device)
    for label, new in (("pika_like_20_tokens", 20), ("decode_128_tokens", 128)):
        times = []
        for _ in range(runs + 1):  # the first warms up
            sync(device)
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sync(device)
            times.append(time.perf_counter() - start)
        best = statistics.median(times[1:])
        result[label] = {"ms": best * 1e3, "tok_per_s": new / best}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--offline-n", type=int, default=200)
    parser.add_argument("--server-n", type=int, default=300, help="requests per load point")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on a CPU: every section, a few requests each")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device, concurrency, levels, load_n, runs = "cuda", "1,64,256", (64, 256), 900, 3
    if args.smoke:
        device, concurrency, levels, load_n, runs = "cpu", "1,2", (2,), 6, 1
        args.offline_n, args.server_n = 3, 3
    model = build_model(Path(tempfile.mkdtemp(prefix="smollm2_random_")))
    report: dict = {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (smoke run)",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "model": "SmolLM2-135M shape, seeded random weights", "goals": GOALS, "errors": {},
    }
    sections = (("offline_pika", lambda: offline_pika(model, args.offline_n, device)),
                ("offline_load", lambda: offline_load(model, device, levels, load_n)),
                ("decode", lambda: decode(model, device)),
                ("graph_replay", lambda: graph_replay(model, device)),
                ("server", lambda: server(model, args.out, args.server_n, device, concurrency)),
                ("transformers", lambda: transformers_reference(model, device, runs)))
    for name, run in sections:
        start = time.perf_counter()
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001  # record it and go on: a partial result teaches
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(model, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
