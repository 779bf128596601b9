"""What the HTTP server adds to the Pika request, over the offline engine, in one run.

The same request (the Pika seed request: ~430 prompt tokens, greedy) goes, alternately,
through the offline engine in this process (`LLM.generate`, chat template included) and through
a `pikaserve serve` subprocess over HTTP (httpx, keep-alive; non-streamed, and streamed with SSE
parsing). Both sides run the same model, dtype and engine settings, each with its system prompt
already in its prefix cache; the idle side only waits, so they do not compete for cores. Rounds
alternate (A B C A B C ...) so drift on a busy machine hits every path alike; the overhead is
the median of per-round differences.

Variants: "seed" is the request as the deployment sent it (max_tokens 50, no constraint: the
model writes 50 tokens); "schema" adds the Pika answer schema (a short JSON answer), which is
how the server is meant to run (--default-response-format).
Writes benchmarks/results/server_overhead.json.

    python benchmarks/server_overhead.py [--rounds 15] [--model PATH] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pikaserve.data import PIKA, pika_answer_schema, pika_seed_request
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, dtype: str, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pikaserve", "serve", "--port", str(port), "--dtype", dtype,
            "--disable-log-requests", "--uvicorn-log-level", "warning"]
    if model:
        argv += ["--model", model]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not start")


def offline_once(llm: LLM, body: dict, params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    (c,) = llm.generate([body["messages"]], params)
    return time.perf_counter() - start, len(c.token_ids)


def server_once(client: httpx.Client, body: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", content=body)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed, r.json()["usage"]["completion_tokens"]


def stream_once(client: httpx.Client, body: dict) -> tuple[float, float, int]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                       "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, ttft or 0.0, tokens


def summary(values: list[float]) -> dict:
    ms = sorted(v * 1e3 for v in values)
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0], "p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def run_variant(llm: LLM, client: httpx.Client, body: dict, params: SamplingParams,
                rounds: int) -> dict:
    raw = json.dumps(body).encode()
    for _ in range(2):  # warm-up: caches, allocator, first-use paths on both sides
        offline_once(llm, body, params)
        server_once(client, raw)
        stream_once(client, body)
    off, srv, sse, ttft, tokens = [], [], [], [], set()
    for _ in range(rounds):
        t, n_off = offline_once(llm, body, params)
        off.append(t)
        t, n_srv = server_once(client, raw)
        srv.append(t)
        t, first, n_sse = stream_once(client, body)
        sse.append(t)
        ttft.append(first)
        tokens.update((n_off, n_srv, n_sse))
    n = max(tokens)
    diff = [s - o for s, o in zip(srv, off)]
    diff_sse = [s - o for s, o in zip(sse, off)]
    return {
        "output_tokens": sorted(tokens),
        "offline": summary(off),
        "server_non_streaming": summary(srv),
        "server_streaming": summary(sse),
        "server_streaming_ttft": summary(ttft),
        "overhead_non_streaming_ms": statistics.median(diff) * 1e3,
        "overhead_streaming_ms": statistics.median(diff_sse) * 1e3,
        "overhead_non_streaming_pct": 100 * statistics.median(diff) / statistics.median(off),
        "overhead_streaming_per_token_ms": statistics.median(diff_sse) * 1e3 / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "server_overhead.json")
    args = ap.parse_args()

    port = free_port()
    server = start_server(args.model, args.dtype, port)
    try:
        llm = LLM(args.model, dtype=args.dtype)
        seed = pika_seed_request()
        if args.model:
            seed.pop("model")  # the served name is the --model string then
        plain = SamplingParams(max_tokens=seed["max_tokens"], temperature=0)
        results = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            results["seed"] = run_variant(llm, client, seed, plain, args.rounds)
            try:
                import pikaserve.structured  # noqa: F401
            except ImportError:
                results["schema"] = "skipped: structured outputs not available"
            else:
                schema = pika_answer_schema()
                body = {**seed, "response_format": {"type": "json_schema", "json_schema": {
                    "name": "pika", "schema": schema}}}
                params = SamplingParams(max_tokens=seed["max_tokens"], temperature=0,
                                        structured_outputs=StructuredOutputsParams(json=schema))
                results["schema"] = run_variant(llm, client, body, params, args.rounds)
    finally:
        server.terminate()
        server.wait(60)
    report = {
        "benchmark": "server_overhead",
        "what": "latency of the Pika seed request through `pikaserve serve` (HTTP, httpx "
                "client on the same machine) minus the offline engine (LLM.generate), "
                "alternating rounds, median of per-round differences",
        "machine": describe_machine(),
        "config": {"model": args.model or "embedded SmolLM2-135M-Instruct Q4_1 GGUF",
                   "dtype": str(llm.engine.dtype).removeprefix("torch."),
                   "device": str(llm.engine.device), "rounds": args.rounds,
                   "request": str(PIKA / "seed_request.json"),
                   "load_avg_at_end": os.getloadavg()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
