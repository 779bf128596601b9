"""What the Ray Serve hop costs: one engine served in-process against the same engine as the
one replica of a cluster (`--replicas 1 --ray-address`, all cores for it), side by side in one
`pikaserve bench --compare` run of the Pika workload (every turn new) at 1, 4 and 16 clients.
Writes benchmarks/results/cluster_overhead/.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from cluster_routing import start_ray_head, start_server
from pikaserve.bench.cli import main as bench_main
from pikaserve.model.loader import default_model_path

OUT = Path(__file__).parent / "results" / "cluster_overhead"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=48, help="requests per load point and server")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    engine = ["--model", str(default_model_path()), "--disable-log-requests"]
    with ExitStack() as stack:
        ray_port = start_ray_head(stack, 4)
        urls = [start_server(stack, "in-process", engine, args.out),
                start_server(stack, "ray-1-replica", [*engine, "--replicas", "1",
                                                      "--ray-address", f"127.0.0.1:{ray_port}"],
                             args.out)]
        return bench_main([
            "--url", urls[0], "--compare", urls[1], "--labels", "in-process,ray-1-replica",
            "--workload", "pika", "--pika-schema", "json_object", "--concurrency",
            args.concurrency, "-n", str(args.n), "--warmup", "4", "--no-progress",
            "--output-dir", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
