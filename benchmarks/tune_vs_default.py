"""A tuned config against the default, side by side in one `pikaserve bench --compare` run.

Starts `pikaserve serve` twice on free loopback ports, with the built-in defaults and with the
tuned `--config` (best.yaml from `pikaserve tune`), then sends both the same Pika requests at
the same open-loop rates, interleaved (never both loaded at once), and reports goodput under
the SLO side by side. Every turn is new to both servers.

    python benchmarks/tune_vs_default.py --best benchmarks/results/tune_pika/best.yaml \
        --slo e2e=300ms --rate 8,10,12 --out benchmarks/results/tune_pika/compare
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from pikaserve.bench.cli import main as bench_main
from pikaserve.tune.server_process import ServerProcess, free_port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--best", type=Path, required=True, help="the tuned serve --config YAML")
    p.add_argument("--slo", required=True, help="as pikaserve bench --slo, e.g. e2e=300ms")
    p.add_argument("--rate", default="8,10,12", help="open-loop rates (req/s), comma-separated")
    p.add_argument("-n", "--num-requests", type=int, default=96, help="requests per rate and server")
    p.add_argument("--out", type=Path, required=True, help="results directory")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        urls = []
        for name, extra in (("default", []), ("tuned", ["--config", str(args.best)])):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "pikaserve", "serve", "--port", str(port), *extra]
            stack.enter_context(ServerProcess(argv, url, args.out / f"{name}.log")).wait_ready(300)
            urls.append(url)
        return bench_main([
            "--url", urls[0], "--compare", urls[1], "--labels", "default,tuned", "--workload", "pika",
            "--rate", args.rate, "-n", str(args.num_requests), "--warmup", "4", "--slo", args.slo,
            "--output-dir", str(args.out), "--no-progress",
        ])


if __name__ == "__main__":
    sys.exit(main())
