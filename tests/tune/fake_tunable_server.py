"""A fake OpenAI server whose speed is a known function of its config, for the tuner's tests.

It answers `--slots` completions at once, each after `--service-ms`; the rest queue. So with
evenly spaced arrivals its E2E latency is service-ms up to slots / service-ms requests/s and
grows without bound past it: the best config and its highest rate under an E2E SLO are known.
`--mode fail` exits at once (a config that cannot start); `--mode crash` dies at its 20th
completion; `--mode once` starts the first time only. Every start is appended to `--starts
FILE`, so tests can count them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by the tuner

from tests.bench.fake_openai import FakeOpenAIServer, Plan

CRASH_AT = 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--service-ms", type=float, required=True)
    p.add_argument("--mode", choices=("ok", "fail", "crash", "once"), default="ok")
    p.add_argument("--starts", type=Path, required=True)
    args = p.parse_args()
    started_before = args.starts.exists() and args.starts.read_text() != ""
    with open(args.starts, "a") as f:
        f.write(f"slots={args.slots} service_ms={args.service_ms:g} mode={args.mode}\n")
    if args.mode == "fail" or (args.mode == "once" and started_before):
        sys.exit("fake server: this config cannot start")
    served = 0

    def plan(body: dict) -> Plan:
        nonlocal served
        served += 1
        if args.mode == "crash" and served >= CRASH_AT:
            os._exit(1)
        return Plan(chunks=[(args.service_ms / 1000, "ok")], usage_tokens=1)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeOpenAIServer(plan, port=args.port, slots=args.slots):
        stop.wait()


if __name__ == "__main__":
    main()
