"""`pikaserve tune` end to end against fake servers whose speed is a known function of their
config (fake_tunable_server.py), started by the tuner through --server-cmd."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from pikaserve.cli import main

FAKE = Path(__file__).with_name("fake_tunable_server.py")
QUICK = ["--workload", "random", "--arrival", "constant", "--warmup", "0", "--unloaded-requests", "4",
         "--probe-requests", "32", "--max-probe-seconds", "1", "--max-rate-probes", "4", "--tolerance", "0.15", "--confirm", "0", "--no-progress"]


def tune(tmp_path: Path, *args: str, mode: str = "ok") -> int:
    cmd = (f"{sys.executable} {FAKE} --port {{port}} --slots {{slots}} --service-ms {{service_ms}} "
           f"--mode {mode if mode != 'knob' else '{mode}'} --starts {tmp_path / 'starts.txt'}")
    return main(["tune", "--server-cmd", cmd, "--out", str(tmp_path / "out"), *QUICK, *args])


def starts(tmp_path: Path) -> list[str]:
    path = tmp_path / "starts.txt"
    return path.read_text().splitlines() if path.exists() else []


def results(tmp_path: Path) -> dict[str, dict]:
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    return {r["config"]: r for r in report["results"]}


@pytest.mark.slow
def test_finds_the_known_best_config_and_its_highest_rate(tmp_path):
    # 4 slots x 80 ms sustain 50 req/s at E2E 80 ms; 2 and 1 slots 25 and 12.5; 300 ms misses 200 ms.
    space = ["--space", "slots=4,2,1", "service_ms=80,300", "--slo", "e2e=200ms,p=90"]
    assert tune(tmp_path, *space, "--confirm", "1") == 0  # the last --confirm wins
    found = results(tmp_path)
    best = found["default (slots=4 service_ms=80)"]
    assert best["rank"] == 1 and best["status"] == "searched"
    assert 50 * (1 - 0.15 - 0.1) <= best["max_rate"] <= 50 * 1.05  # search tolerance, plus timing slack
    assert best["searches"] == 2  # confirmed on a second server; the others were not
    assert len(starts(tmp_path)) == 6 + 1 and all(r["searches"] == 1 for r in found.values() if r is not best)
    for slots in (4, 2, 1):
        assert found[f"slots={slots} service_ms=300"]["status"] == "slo-unmet"
    for slots in (2, 1):  # their capacity is below the best goodput: no rate search spent on them
        slow = found[f"slots={slots} service_ms=80"]
        assert slow["status"] == "pruned" and slow["capacity"] < 50 * slots / 4 * 1.05
    out = tmp_path / "out"
    assert yaml.safe_load((out / "best.yaml").read_text()) == {"slots": "4", "service_ms": "80"}
    assert (out / "best.yaml").read_text().startswith("# pikaserve tune: best goodput")
    for name in ("tune.csv", "goodput.png", "latency_vs_load.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "tune.json").read_text())
    assert report["knob_effects"][0]["knob"] == "service_ms"  # 300 ms zeroes goodput: the knob that matters most
    assert report["machine"]["cpu_flags"] is not None


@pytest.mark.slow
def test_configs_that_fail_to_start_or_crash_are_recorded_and_the_sweep_goes_on(tmp_path):
    code = tune(tmp_path, "--space", "mode=fail,crash,ok", "slots=2", "service_ms=40", "--slo", "e2e=500ms", mode="knob")
    assert code == 0
    found = results(tmp_path)
    failed = found["default (mode=fail slots=2 service_ms=40)"]
    assert failed["status"] == "failed" and "before it was ready" in failed["detail"]
    assert "this config cannot start" in failed["detail"]  # the log's tail says why
    crashed = found["mode=crash slots=2 service_ms=40"]
    assert crashed["status"] == "failed" and "during the search" in crashed["detail"]
    assert found["mode=ok slots=2 service_ms=40"]["status"] == "searched"
    assert found["mode=ok slots=2 service_ms=40"]["rank"] == 1
    assert len(starts(tmp_path)) == 3


@pytest.mark.slow
def test_a_config_failing_its_confirming_search_counts_it_as_zero(tmp_path):
    assert tune(tmp_path, "--space", "mode=once", "slots=2", "service_ms=40", "--slo", "e2e=500ms", "--confirm", "1", mode="knob") == 0
    result = results(tmp_path)["default (mode=once slots=2 service_ms=40)"]
    assert len(starts(tmp_path)) == 2 and result["searches"] == 2
    first, second = (float(g) for g in result["goodput_per_search"].split())
    assert first > 0 and second == 0 and result["goodput"] == pytest.approx(first / 2, rel=1e-3)
    assert "search 2: exited with status" in result["detail"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_measuring_finished_configs_again(tmp_path, capsys):
    space = ["--space", "slots=2,1", "service_ms=40", "--slo", "e2e=500ms"]
    assert tune(tmp_path, *space, "--budget", "0.5s") == 0  # the budget stops it after the first config
    assert starts(tmp_path) == ["slots=2 service_ms=40 mode=ok"]
    assert results(tmp_path)["slots=1 service_ms=40"]["status"] == "not-run"
    first = results(tmp_path)["default (slots=2 service_ms=40)"]
    capsys.readouterr()
    assert tune(tmp_path, *space) == 0
    assert starts(tmp_path) == ["slots=2 service_ms=40 mode=ok", "slots=1 service_ms=40 mode=ok"]
    assert "(reused)" in capsys.readouterr().out
    again = results(tmp_path)
    assert again["default (slots=2 service_ms=40)"]["goodput"] == first["goodput"]
    assert again["slots=1 service_ms=40"]["status"] in ("searched", "pruned")


@pytest.mark.parametrize("args, message", [
    (["--space", "slots=2", "service_ms=40", "--slo", "e2e=fast"], "not a duration"),
    (["--space", "slots=2", "--slo", "e2e=1s"], "without values in --space: service_ms"),
    (["--space", "slots=2", "service_ms=40", "threads=2", "--slo", "e2e=1s"], "not a placeholder"),
    (["--space", "slots", "service_ms=40", "--slo", "e2e=1s"], "expected KNOB=VALUE"),
    (["--slo", "e2e=1s"], "--server-cmd needs --space"),
    (["--space", "slots=2", "service_ms=40", "--slo", "e2e=1s", "--workload", "nope.jsonl"], "neither one of"),
])
def test_bad_space_slo_or_workload_exit_2_before_any_server_starts(tmp_path, capsys, args, message):
    assert tune(tmp_path, *args) == 2
    assert message in " ".join(capsys.readouterr().out.split())
    assert starts(tmp_path) == []


def test_bad_pikaserve_space_exits_2(tmp_path, capsys):
    assert main(["tune", "--space", "max_num_seqs=0", "--slo", "e2e=1s", "--out", str(tmp_path)]) == 2
    assert "max_num_seqs must be >= 1" in capsys.readouterr().out
