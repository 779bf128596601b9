"""What the Ray Serve hop costs: one engine served in-process against the same engine as the
one replica of a cluster (`--replicas 1 --ray-address`, all cores for it), side by side in one
`pikaserve bench --compare` run of the Pika workload (every turn new) at 1, 4 and 16 clients.
Writes benchmarks/results/cluster_overhead/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from pika_vs_llamacpp import free_port, start, wait_ready
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
    os.environ["RAY_AUTH_MODE"] = "token"  # the head and the server that joins it
    with ExitStack() as stack:
        ray_port = free_port()
        subprocess.run(["ray", "start", "--head", "--port", str(ray_port), "--num-cpus", "4",
                        "--include-dashboard=false", "--disable-usage-stats"], check=True,
                       capture_output=True)
        stack.callback(subprocess.run, ["ray", "stop", "--force"], capture_output=True)
        urls = []
        for label, extra in (("in-process", []),
                             ("ray-1-replica", ["--replicas", "1", "--ray-address",
                                                f"127.0.0.1:{ray_port}"])):
            port = free_port()
            proc = start([sys.executable, "-m", "pikaserve", "serve", "--model",
                          str(default_model_path()), "--disable-log-requests", "--port",
                          str(port), *extra], args.out / f"serve_{label}.log")
            stack.callback(proc.wait, 60)
            stack.callback(proc.terminate)
            urls.append(f"http://127.0.0.1:{port}")
            print(f"{label}: ready in {wait_ready(urls[-1], proc, 300):.1f} s")
        return bench_main([
            "--url", urls[0], "--compare", urls[1], "--labels", "in-process,ray-1-replica",
            "--workload", "pika", "--pika-schema", "json_object", "--concurrency",
            args.concurrency, "-n", str(args.n), "--warmup", "4", "--no-progress",
            "--output-dir", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
