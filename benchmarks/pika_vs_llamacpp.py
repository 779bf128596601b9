"""pikaserve vs llama.cpp's server on this machine, side by side in one `pikaserve bench` run.

Starts both servers on free loopback ports with the same GGUF file (the embedded SmolLM2-135M
Q4_1), threads = cores for both (llama.cpp with --interrupt_requests False, so a new request
waits instead of aborting the running one), then runs:
  1. the Pika workload (JSON-schema answers) at concurrency 1, 4 and 16, every turn new to
     both servers (the bench sends each of its ~1,880 turns once per run);
  2. a plain completion of 128 tokens at batch 1 (decode speed).
Results (JSON, CSV, PNG) go to benchmarks/results/pika_vs_llamacpp/{pika,decode}/.

llama.cpp comes from `pip install "llama-cpp-python[server]"` in its own venv (never a project
dependency); pass its python with --llamacpp-python (default /opt/llamacpp-venv/bin/python).
The instruction sets its build uses are written to llamacpp_system_info.txt beside the results.

The AVX2 class on an AVX512 machine: cap pikaserve's kernels (its server inherits the
environment) and give llama.cpp a build without AVX512:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/pika_vs_llamacpp.py \
        --llamacpp-python /opt/llamacpp-avx2-venv/bin/python \
        --out benchmarks/results/pika_vs_llamacpp_avx2

with that venv's llama-cpp-python built by CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF"
pip install --no-cache-dir "llama-cpp-python[server]".

The AVX512-without-BF16 class (e.g. Intel Cascade Lake and Ice Lake: AVX512 and VNNI, no
native bfloat16): cap oneDNN below its bfloat16 ISAs, so dtype auto chooses float32, and keep
llama.cpp's native build (its Q4 kernels use AVX512 and VNNI, not bfloat16):

    ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI \
        python benchmarks/pika_vs_llamacpp.py --out benchmarks/results/pika_vs_llamacpp_avx512_vnni
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from pikaserve.bench.cli import main as bench_main
from pikaserve.model.loader import default_model_path

OUT = Path(__file__).parent / "results" / "pika_vs_llamacpp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llamacpp-python", default="/opt/llamacpp-venv/bin/python")
    parser.add_argument("-n", type=int, default=48, help="requests per load point and server")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model = str(default_model_path())
    threads = str(len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    system_info = subprocess.run(
        [args.llamacpp_python, "-c",
         "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, check=True).stdout
    (args.out / "llamacpp_system_info.txt").write_text(system_info)
    ours_port, theirs_port = free_port(), free_port()
    ours_url, theirs_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
    with ExitStack() as stack:
        ours = start([sys.executable, "-m", "pikaserve", "serve", "--model", model,
                      "--port", str(ours_port), "--disable-log-requests"],
                     args.out / "pikaserve.log")
        stack.callback(ours.terminate)
        ready = wait_ready(ours_url, ours)
        print(f"pikaserve ready in {ready:.1f} s")
        (args.out / "pikaserve_ready_s.txt").write_text(f"{ready:.2f}\n")
        theirs = start([args.llamacpp_python, "-m", "llama_cpp.server", "--model", model,
                        "--n_threads", threads, "--n_threads_batch", threads,
                        "--n_ctx", "2048", "--port", str(theirs_port),
                        # queue concurrent requests instead of cutting the running one short
                        "--interrupt_requests", "False"],
                       args.out / "llamacpp.log")
        stack.callback(theirs.terminate)
        print(f"llama.cpp ready in {wait_ready(theirs_url, theirs):.1f} s")
        common = ["--url", ours_url, "--compare", theirs_url, "--labels", "pikaserve,llama.cpp",
                  "--no-progress"]
        rc = bench_main(common + [
            "--workload", "pika", "--pika-schema", "json_object", "--concurrency",
            args.concurrency, "-n", str(args.n), "--warmup", "4",
            "--slo", "ttft=100ms,e2e=300ms", "--output-dir", str(args.out / "pika")])
        rc |= bench_main(common + [
            "--workload", "random", "--input-len", "32", "--output-len", "128", "--ignore-eos",
            "--concurrency", "1", "-n", "8", "--warmup", "1",
            "--output-dir", str(args.out / "decode")])
    return rc


if __name__ == "__main__":
    sys.exit(main())
