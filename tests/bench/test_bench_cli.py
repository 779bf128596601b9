"""`pikaserve bench` from the command line: flags, console tables, JSON/CSV/PNG outputs."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from pikaserve.bench import cli

from .fake_openai import FakeOpenAIServer, Plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_sweep_writes_json_csv_and_plots(fake_server: Callable[..., FakeOpenAIServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast = fake_server(lambda body: Plan(chunks=[(0.0, "a"), (0.005, "b")], usage_tokens=2))
    slow = fake_server(lambda body: Plan(chunks=[(0.01, "a"), (0.01, "b")], usage_tokens=2))
    out = tmp_path / "out"
    argv = ["--url", fast.url + "/v1/", "--compare", slow.url, "--labels", "fast,slow", "--workload", "random",
            "--input-len", "8", "--output-len", "2", "--concurrency", "1,2", "-n", "4", "--slo", "ttft=1s,e2e=2s",
            "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    console = capsys.readouterr().out
    assert "concurrency 1" in console and "slow / fast" in console and "Sweep" in console and "TTFT median (ms)" in console

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [p["concurrency"] for p in results["points"]] == [1, 2]
    point = results["points"][1]
    assert [s["label"] for s in point["servers"]] == ["fast", "slow"]
    assert point["servers"][0]["metrics"]["completed"] == 4 and point["servers"][0]["metrics"]["goodput"] > 0
    ratio = point["ratios"]["slow"]["e2e_median_ms"]
    slow_e2e, fast_e2e = (s["metrics"]["e2e"]["median"] for s in point["servers"][::-1])
    assert ratio == pytest.approx(slow_e2e / fast_e2e)
    assert results["config"]["slos"] == ["ttft<=1000ms", "e2e<=2000ms"] and results["machine"]["cpu_count"]

    with (out / "results.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["concurrency"], r["server"]) for r in rows] == [("1", "fast"), ("1", "slow"), ("2", "fast"), ("2", "slow")]
    assert {"ttft_p99_ms", "itl_median_ms", "tpot_mean_ms", "e2e_max_ms", "goodput", "json_validity", "errors"} <= set(rows[0])
    with (out / "requests.csv").open(encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 16  # 2 points x 2 servers x 4 requests
    for name in ("latency_vs_load.png", "throughput_vs_latency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_pika_rate_run_reports_validity(fake_server: Callable[..., FakeOpenAIServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = fake_server(lambda body: Plan(chunks=[(0.0, '{"emotion":"calm",'), (0.0, '"learn_score":false}')]))
    argv = ["--url", server.url, "--rate", "50", "--max-concurrency", "2", "-n", "5", "--warmup", "1",
            "--output-dir", str(tmp_path), "--no-plots", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "JSON validity" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["points"][0]["servers"][0]["metrics"]
    assert metrics["json_validity"] == 1.0 and metrics["queue_wait"] is not None
    assert not (tmp_path / "latency_vs_load.png").exists()


def test_all_requests_failing_is_a_failed_run(closed_port_url: str, tmp_path: Path) -> None:
    argv = ["--url", closed_port_url, "--model", "m", "--workload", "random", "-n", "2", "--output-dir", str(tmp_path), "--no-plots", "--no-progress"]
    assert cli.main(argv) == 1
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["points"][0]["servers"][0]["metrics"]["errors"] == {"connect": 2}


@pytest.mark.parametrize(
    "extra",
    [["--concurrency", "2", "--rate", "5"], ["--endpoint", "completions", "--model", "m"], ["--slo", "latency=5ms"], ["--concurrency", "0"], ["--workload", "file"], ["--labels", "a,b"]],
)
def test_bad_flags_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--url", "http://127.0.0.1:9", "--no-progress", *extra]) == 2
    assert "error:" in capsys.readouterr().out


def test_registers_as_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="pikaserve")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--url", "localhost:8000", "--compare", "h:1", "h:2", "--rate", "1,inf"])
    config = cli.config_from_args(args)
    assert config.urls == ("http://localhost:8000", "http://h:1", "http://h:2")
    assert [p.label for p in config.points] == ["rate 1/s", "rate inf/s"] and config.num_requests == 100


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "pikaserve.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--compare" in done.stdout and "pikaserve bench" in done.stdout


def test_pikaserve_bench_subcommand_runs(fake_server: Callable[..., FakeOpenAIServer], tmp_path: Path) -> None:
    from pikaserve import cli as pikaserve_cli

    server = fake_server(lambda body: Plan(chunks=[(0.0, '{"emotion":"calm","learn_score":true}')]))
    argv = ["bench", "--url", server.url, "-n", "2", "--no-plots", "--no-progress", "--output-dir", str(tmp_path)]
    assert pikaserve_cli.main(argv) == 0 and (tmp_path / "results.json").is_file()
