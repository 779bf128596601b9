"""What the HTTP server adds to the Pika request, over the offline engine, in one run.

Two engines on the same model, dtype and settings, in this process: one offline (`LLM.generate`,
chat template included), one behind the real server app (uvicorn on 127.0.0.1, an httpx
keep-alive client). Rounds alternate offline / server non-streamed / server streamed, each with
the system prompt already in its prefix cache.

Two measures:
- end to end: the median of per-round differences (server total - offline total). Honest but
  noisy: on a busy CPU the model's own time varies by more than the server adds.
- added latency, exact: for every request, wall time minus the engine's own span (its request
  entering the engine to its last output, from the engine's timestamps); the server's figure
  minus the offline figure is what HTTP, parsing, SSE and the thread hand-offs add. Model-time
  noise cancels out of this one.

The offline engine runs on a worker thread, as the server's engine does: on a CPU that matters
(PyTorch's intra-op threading differs between the main thread and other threads; on a busy
2-core machine the main thread ran the model up to 10x slower).

Variants: "seed" is the request as the deployment sent it (max_tokens 50, no constraint: the
model writes 50 tokens); "schema" adds the Pika answer schema (a short JSON answer), which is
how the server is meant to run (--default-response-format).
Writes benchmarks/results/server_overhead.json.

    python benchmarks/server_overhead.py [--rounds 12] [--model PATH] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from pikaserve.config import EngineConfig, ServerConfig
from pikaserve.data import pika_answer_schema, pika_seed_request
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine
from pikaserve.server.app import create_app

RESULTS = Path(__file__).parent / "results"
KV_BYTES = 256 * 2**20  # two engines in one process: keep each KV cache small


class RecordingEngine(AsyncEngine):
    """AsyncEngine that remembers each request's engine-side span (for the exact measure)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.spans: dict[str, tuple[float, float]] = {}

    async def generate(self, request_id, token_ids, params, constraint=None):
        async for out in super().generate(request_id, token_ids, params, constraint):
            if out.finished:
                self.spans[request_id] = (out.arrival_time, out.finished_time)
            yield out


def start_server(engine: AsyncEngine) -> tuple[uvicorn.Server, str]:
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; with proto 0
    # Nagle holds the response body behind the client's delayed ACK (+40 ms per request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    app = create_app(ServerConfig(disable_log_requests=True), engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def offline_once(pool: ThreadPoolExecutor, llm: LLM, body: dict, params: SamplingParams):
    def run():
        start = time.perf_counter()
        (c,) = llm.generate([body["messages"]], params)
        return time.perf_counter() - start, c.e2e, len(c.token_ids), None

    return pool.submit(run).result()


def server_once(client: httpx.Client, engine: RecordingEngine, body: bytes):
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", content=body)
    total = time.perf_counter() - start
    r.raise_for_status()
    out = r.json()
    a, f = engine.spans.pop(out["id"])
    return total, f - a, out["usage"]["completion_tokens"], None


def stream_once(client: httpx.Client, engine: RecordingEngine, body: dict):
    start = time.perf_counter()
    ttft, tokens, rid = None, 0, None
    with client.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    a, f = engine.spans.pop(rid)
    return total, f - a, tokens, ttft


def ms(values: list[float]) -> dict:
    v = sorted(x * 1e3 for x in values)
    return {"median_ms": round(statistics.median(v), 3), "min_ms": round(v[0], 3),
            "p90_ms": round(v[int(0.9 * (len(v) - 1))], 3)}


def run_variant(pool, llm, client, engine, body: dict, params: SamplingParams,
                rounds: int) -> dict:
    raw = json.dumps(body).encode()
    paths = {
        "offline": lambda: offline_once(pool, llm, body, params),
        "server_non_streaming": lambda: server_once(client, engine, raw),
        "server_streaming": lambda: stream_once(client, engine, body),
    }
    for _ in range(2):  # warm-up: prefix cache, allocator, first-use code paths
        for fn in paths.values():
            fn()
    rows: dict[str, list[tuple]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            rows[name].append(fn())
    out: dict = {"output_tokens": sorted({r[2] for rs in rows.values() for r in rs})}
    outside = {}  # per path: wall time outside the engine's span
    for name, rs in rows.items():
        outside[name] = [total - span for total, span, _, _ in rs]
        out[name] = {"total": ms([r[0] for r in rs]), "engine_span": ms([r[1] for r in rs]),
                     "outside_engine": ms(outside[name])}
    out["server_streaming"]["client_ttft"] = ms([r[3] for r in rows["server_streaming"]])
    off_med = statistics.median(outside["offline"])
    for name in ("server_non_streaming", "server_streaming"):
        paired = [s[0] - o[0] for s, o in zip(rows[name], rows["offline"])]
        out[name]["added_latency_exact_ms"] = round(
            (statistics.median(outside[name]) - off_med) * 1e3, 3)
        out[name]["added_latency_end_to_end_ms"] = round(statistics.median(paired) * 1e3, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "server_overhead.json")
    args = ap.parse_args()

    load_start = os.getloadavg()
    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory_bytes=KV_BYTES)
    pool = ThreadPoolExecutor(1)
    llm = pool.submit(lambda: LLM(args.model, dtype=args.dtype,
                                  kv_cache_memory_bytes=KV_BYTES)).result()
    engine = RecordingEngine(config)
    server, url = start_server(engine)
    seed = pika_seed_request()
    if args.model:
        seed.pop("model")  # the served name is the --model string then
    results = {}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            plain = SamplingParams(max_tokens=seed["max_tokens"], temperature=0)
            results["seed"] = run_variant(pool, llm, client, engine, seed, plain, args.rounds)
            schema = pika_answer_schema()
            body = {**seed, "response_format": {"type": "json_schema", "json_schema": {
                "name": "pika", "schema": schema}}}
            params = SamplingParams(max_tokens=seed["max_tokens"], temperature=0,
                                    structured_outputs=StructuredOutputsParams(json=schema))
            results["schema"] = run_variant(pool, llm, client, engine, body, params,
                                            args.rounds)
    finally:
        server.should_exit = True
        engine.shutdown()
    report = {
        "benchmark": "server_overhead",
        "what": "latency the HTTP server adds to the Pika seed request over the offline "
                "engine; see the module docstring for the two measures",
        "machine": describe_machine(),
        "config": {"model": args.model or "embedded SmolLM2-135M-Instruct Q4_1 GGUF",
                   "dtype": str(llm.engine.dtype).removeprefix("torch."),
                   "device": str(llm.engine.device), "rounds": args.rounds,
                   "client": "httpx, same process, keep-alive",
                   "request": "pikaserve/data/pika/seed_request.json",
                   "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
