"""Replica routing and the prefix cache's second tier, side by side in one run on this machine.

1. Routing (results/cluster_routing/routing/): three pikaserve servers, each with 2 engine
   replicas on one shared Ray instance (started here, joined with --ray-address), one per
   --routing policy (prefix, round-robin, pow2). Each replica's KV cache holds about 7 of the
   workload's 12 distinct 330-token system prompts (Pika's size), so a replica that sees every
   prompt keeps evicting them, and one that sees half keeps them all.
2. Tier (results/cluster_routing/tier/): two single-process servers with that same small KV
   cache, one with --kv-offloading-size 1 (GiB), one without.

Both parts send the prefix-repetition workload (12 prefixes, a new 40-token suffix on every
request, 8 output tokens) through one `pikaserve bench --compare` run at concurrency 4 and
16: the same requests to every server, interleaved rounds, never two servers at once. The
prefix-cache hit rate of each server (prompt tokens found / looked up, warm-up included) is
read from its /metrics and written to hit_rates.json beside the bench results.

The replicas of one server share this machine's cores (--num-threads 1 each on 2 cores), so
two replicas here show the routing's effect on the cache, not two machines' throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

import torch
from pika_vs_llamacpp import free_port, start, wait_ready
from pikaserve.bench.cli import main as bench_main
from pikaserve.engine.device import resolve_dtype
from pikaserve.model.loader import default_model_path

OUT = Path(__file__).parent / "results" / "cluster_routing"
POLICIES = ("prefix", "round-robin", "pow2")
NUM_PREFIXES = 12
PREFIX_LEN = 330
POOL_TOKENS = 2400  # per replica: ~7 of the 12 prefixes, with room for the running requests
KV_VALUES_PER_TOKEN = 2 * 30 * 3 * 64  # SmolLM2-135M: keys and values, 30 layers, 3 KV heads x 64


def hit_rate(url: str) -> dict[str, float]:
    """Prompt tokens looked up in / found in the prefix cache, summed over replicas."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = {}
    for name in ("prefix_cache_queries", "prefix_cache_hits", "kv_offload_restored_blocks"):
        values = re.findall(rf"^pikaserve:{name}_total{{[^}}]*}} (\S+)$", text, re.M)
        total[name] = sum(float(v) for v in values)
    total["hit_rate"] = total["prefix_cache_hits"] / max(total["prefix_cache_queries"], 1.0)
    return total


def start_ray_head(stack: ExitStack, cpus: int) -> int:
    """A Ray head on a free port, stopped when `stack` closes; servers join it with
    --ray-address. Token authentication on, for the head and the servers started after."""
    os.environ["RAY_AUTH_MODE"] = "token"  # they read the token from ~/.ray/auth_token
    port = free_port()
    subprocess.run(["ray", "start", "--head", "--port", str(port), "--num-cpus", str(cpus),
                    "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   capture_output=True)
    stack.callback(subprocess.run, ["ray", "stop", "--force"], capture_output=True)
    return port


def start_server(stack: ExitStack, label: str, argv: list[str], out: Path) -> str:
    """`pikaserve serve ARGV` on a free port, ready, terminated when `stack` closes."""
    port = free_port()
    proc = start([sys.executable, "-m", "pikaserve", "serve", *argv, "--port", str(port)],
                 out / f"serve_{label}.log")
    stack.callback(proc.wait, 60)
    stack.callback(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    print(f"{label}: ready in {wait_ready(url, proc, 300):.1f} s")
    return url


def bench(urls: list[str], labels: list[str], out: Path, n: int, concurrency: str) -> int:
    return bench_main([
        "--url", urls[0], "--compare", *urls[1:], "--labels", ",".join(labels),
        "--endpoint", "completions", "--workload", "prefix-repetition",
        "--num-prefixes", str(NUM_PREFIXES), "--prefix-len", str(PREFIX_LEN),
        "--suffix-len", "40", "--output-len", "8", "--concurrency", concurrency,
        "-n", str(n), "--warmup", "12", "--no-progress", "--output-dir", str(out)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=96, help="requests per load point and server")
    parser.add_argument("--concurrency", default="4,16")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model = str(default_model_path())
    dtype = resolve_dtype("auto", torch.device("cpu"))  # what the servers will choose here
    token_bytes = KV_VALUES_PER_TOKEN * torch.empty((), dtype=dtype).element_size()
    engine = ["--model", model, "--disable-log-requests", "--max-model-len", "1024",
              "--kv-cache-memory-bytes", str(POOL_TOKENS * token_bytes)]
    args.out.mkdir(parents=True, exist_ok=True)
    rc = 0
    with ExitStack() as stack:
        ray_port = start_ray_head(stack, 8)
        urls = [start_server(stack, policy, [*engine, "--replicas", "2", "--num-threads", "1",
                                             "--routing", policy, "--ray-address",
                                             f"127.0.0.1:{ray_port}"], args.out)
                for policy in POLICIES]
        rc |= bench(urls, list(POLICIES), args.out / "routing", args.n, args.concurrency)
        rates = {policy: hit_rate(url) for policy, url in zip(POLICIES, urls)}
        (args.out / "routing" / "hit_rates.json").write_text(json.dumps(rates, indent=1) + "\n")
    with ExitStack() as stack:
        labels = ["tier-off", "tier-on"]
        urls = [start_server(stack, "tier-off", engine, args.out),
                start_server(stack, "tier-on", [*engine, "--kv-offloading-size", "1"], args.out)]
        rc |= bench(urls, labels, args.out / "tier", args.n, args.concurrency)
        rates = {label: hit_rate(url) for label, url in zip(labels, urls)}
        (args.out / "tier" / "hit_rates.json").write_text(json.dumps(rates, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
