#!/usr/bin/env bash
# The GPU check: pikaserve's CUDA backend tested and timed on one NVIDIA GPU (docs/gpu.md).
#
# Before it travels: run benchmarks/gpu/prepare.sh on a machine with PyPI access (it fills
# benchmarks/gpu/wheels/ and benchmarks/gpu/smollm2/; carry both). Then, on the GPU machine,
# from anywhere:  bash benchmarks/gpu/check.sh
# There, `python3` is the Python that holds torch (there may be no `python`); the carried
# wheels go to /tmp/site, on PYTHONPATH, leaving the machine's own packages as they are.
# Budget: ~6 minutes on one H100/H200 (tests <= 4, benchmark <= 5, each under its own timeout;
# TESTS_TIMEOUT and BENCH_TIMEOUT, in seconds, change them; BENCH_ARGS goes to bench_gpu.py).
# Results go to benchmarks/results/gpu/ (and to $OUT after each step when that is set, as the
# device runner does). A failing step is recorded and the next one still runs.
#
# `check.sh --smoke` checks the script itself on a CPU (CUDA tests skip, the benchmark runs a
# few requests per section) and writes to /tmp/pikaserve-gpu-smoke instead.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=benchmarks/results/gpu
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then
    RESULTS=/tmp/pikaserve-gpu-smoke
    SMOKE=(--smoke)
fi
mkdir -p "$RESULTS"
# The device runner brings back at most 8 files from $OUT, and nothing if the whole command is
# stopped: after each step, the small summaries as they are and everything in one tarball.
save() {
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        cp "$RESULTS"/*.txt "$RESULTS"/*.json "$OUT/" 2>/dev/null
        tar czf "$OUT/gpu_results.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    fi
}
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1

# 0. What pikaserve imports and the machine lacks (llguidance, gguf, pydantic, uvicorn, ...).
if compgen -G "benchmarks/gpu/wheels/*.whl" > /dev/null && [ -z "${SMOKE[*]}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site benchmarks/gpu/wheels/*.whl 2>&1 | tail -3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ -z "${SMOKE[*]}" ]; then
    echo "no benchmarks/gpu/wheels: run benchmarks/gpu/prepare.sh first (see docs/gpu.md)" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
    "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
print('transformers', transformers.__version__); \
import importlib.metadata as m; print('llguidance', m.version('llguidance'))"
} > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"
save

# 1. Correctness on the GPU: transformers on CUDA (fp32, fp16, bf16), graphs vs eager,
#    scheduling equivalence, the kernels against torch, the device sampler.
#    A test that hangs is stopped after 90 s (pytest-timeout, where the machine has it) so the
#    others still run; the slowest are listed to keep the check inside its budget.
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 90)
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --durations 15 "${PER_TEST[@]}" \
    tests/cuda tests/attention tests/kernels tests/engine/test_triton_engine.py \
    tests/engine/test_sampler.py tests/engine/test_reference.py 2>&1 | tee "$RESULTS/tests.txt"
tests_rc=${PIPESTATUS[0]}
save

# 2. Timing: Pika offline and over HTTP (1, 64, 256 clients), batch-1 decode, transformers.
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/gpu/bench_gpu.py --out "$RESULTS" "${SMOKE[@]}" ${BENCH_ARGS:-} 2>&1 \
    | tee "$RESULTS/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "tests exit $tests_rc, benchmark exit $bench_rc" | tee -a "$RESULTS/machine.txt"
save
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
