"""`pikaserve tune` of pikaserve itself: every config a real `pikaserve serve --config` process
on the embedded model, the Pika workload, and a best config that `serve --config` takes as is."""

from __future__ import annotations

import json

import pytest
import yaml

from pikaserve.cli import main
from pikaserve.server.cli import load_yaml
from pikaserve.bench.config import LoadPoint
from pikaserve.tune.probe import WorkloadSpec
from pikaserve.tune.space import parse_pikaserve_space, parse_slo
from pikaserve.tune.tuner import TuneConfig


@pytest.mark.slow
def test_tunes_pikaserve_serve_on_the_pika_workload(tmp_path):
    out = tmp_path / "out"
    code = main(["tune", "--space", "max_num_seqs=4", "block_size=16", "--slo", "e2e=5s,p=90", "--out", str(out),
                 "--unloaded-requests", "2", "--probe-requests", "8", "--capacity-concurrency", "4",
                 "--max-rate-probes", "1", "--max-probe-seconds", "1", "--warmup", "1", "--confirm", "0", "--no-progress", "--no-plots"])
    assert code == 0
    report = json.loads((out / "tune.json").read_text())
    by_config = {r["config"]: r for r in report["results"]}
    assert set(by_config) == {"default", "max_num_seqs=4 block_size=16"}
    for r in by_config.values():
        assert r["status"] in ("searched", "pruned"), r["detail"]
        assert r["ready_s"] > 0
        unloaded = r["probes"][0]
        assert unloaded["kind"] == "unloaded" and unloaded["passed"] and unloaded["errors"] == {}
    # every config ran from a --config file of its settings
    written = [yaml.safe_load(p.read_text()) for p in (out / "configs").glob("*.yaml")]
    assert sorted(written, key=len) == [{}, {"max_num_seqs": 4, "block_size": 16}]
    best = by_config[report["best"]]
    assert load_yaml(str(out / "best.yaml")) == {k.replace("_", "-"): v for k, v in best["settings"].items()}


def test_serve_args_may_not_set_a_tuned_knob(tmp_path):
    with pytest.raises(ValueError, match="--serve-args sets max-num-seqs"):
        TuneConfig(parse_pikaserve_space(["max_num_seqs=4,8"]), parse_slo("e2e=1s"), tmp_path,
                   serve_args=("--max-num-seqs", "16"))


def test_a_send_once_workload_that_cannot_last_one_config_is_refused_before_any_start():
    spec = WorkloadSpec("pika", warmup=4)
    spec.check_supply(500)  # ~1,880 Pika turns
    with pytest.raises(ValueError, match="sends each once"):
        spec.check_supply(5000)


def test_the_pika_schema_form_reaches_every_probe():
    spec = WorkloadSpec("pika", pika_schema="json_object")
    config = spec.bench_config("http://127.0.0.1:1", LoadPoint(), 8, parse_slo("e2e=1s"), 16, 0)
    assert config.pika_schema == "json_object" and config.first_index == 16 and config.num_requests == 8
