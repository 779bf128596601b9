"""`pikaserve bench` end to end against a real pikaserve server: JSON, CSV and PNG come out."""

from __future__ import annotations

import csv
import json

from pikaserve.bench.cli import main as bench_main
from .conftest import serve


def test_bench_pika_against_a_real_server(async_engine, tmp_path):
    out = tmp_path / "bench"
    with serve(async_engine) as server:
        rc = bench_main([
            "--url", server.url, "--workload", "pika", "--pika-schema", "json_schema",
            "--concurrency", "1,2", "-n", "4", "--warmup", "1", "--no-progress",
            "--slo", "e2e=60s", "--output-dir", str(out),
        ])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert [p["concurrency"] for p in result["points"]] == [1, 2]
    for point in result["points"]:
        (server_run,) = point["servers"]
        m = server_run["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0
        assert m["json_validity"] == 1.0  # constrained answers are always valid
        assert m["ttft"]["median"] > 0 and m["e2e"]["median"] >= m["ttft"]["median"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 8 and all(r["valid"] == "True" for r in rows)
    for png in ("latency_vs_load.png", "throughput_vs_latency.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
