"""Pika answered by the head vs by the grammar path vs the one-prefill floor, side by side in one
`pikaserve bench --compare` run, at 1 and 16 clients, on this machine.

Three pikaserve servers on free loopback ports, the same default model and settings:
  head     `--head pika`: the Pika schema is answered by the built-in head (one prefill);
  grammar  no head: the model writes the JSON under the schema (fast-forward + drafts);
  floor    no head, and each request sent with `max_tokens: 1` and no schema: one prefill of
           the same prompt and one sampled token, the least any answer can cost.
Each server gets the same turns, in rounds, one server busy at a time; no turn is sent twice
to a server (the bench's Pika turns are the 40 unlabelled plus the ~920 labelled ones), so
every request finds only the system prompt in the prefix cache. Results (JSON, CSV, PNG) go to
benchmarks/results/pika_head_speed/.

    python benchmarks/pika_head_speed.py [-n 96] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

from pika_vs_llamacpp import free_port, start, wait_ready

from pikaserve.bench.cli import main as bench_main

OUT = Path(__file__).parent / "results" / "pika_head_speed"
FLOOR_BODY = {"max_tokens": 1, "response_format": {"type": "text"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=96, help="requests per load point and server")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    servers = {"head": ["--head", "pika"], "grammar": [], "floor": []}
    urls = {}
    with ExitStack() as stack:
        for name, extra in servers.items():
            port = free_port()
            proc = start([sys.executable, "-m", "pikaserve", "serve", "--port", str(port),
                          "--disable-log-requests", *extra], args.out / f"{name}.log")
            stack.callback(proc.terminate)
            urls[name] = f"http://127.0.0.1:{port}"
            print(f"{name} ready in {wait_ready(urls[name], proc):.1f} s")
        rc = bench_main([
            "--url", urls["head"], "--compare", urls["grammar"], urls["floor"],
            "--labels", ",".join(servers), "--server-body", "{}", "{}", json.dumps(FLOOR_BODY),
            "--workload", "pika", "--concurrency", args.concurrency, "-n", str(args.n),
            "--warmup", "4", "--no-progress", "--output-dir", str(args.out)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
