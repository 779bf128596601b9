"""The bounded search on a modelled server: no processes, exact expectations."""

from __future__ import annotations

import pytest

from pikaserve.bench.config import LoadPoint
from pikaserve.tune.search import Probe, SearchSettings, search

SETTINGS = SearchSettings(tolerance=0.05, max_rate_probes=8)


class ModelServer:
    """Capacity `capacity` req/s; the SLO holds up to `holds_to` req/s (unloaded: if `holds_unloaded`)."""

    def __init__(self, capacity: float, holds_to: float, holds_unloaded: bool = True) -> None:
        self.capacity, self.holds_to, self.holds_unloaded = capacity, holds_to, holds_unloaded
        self.calls: list[tuple[str, LoadPoint, int]] = []

    def __call__(self, kind: str, point: LoadPoint, requests: int) -> Probe:
        self.calls.append((kind, point, requests))
        if kind == "unloaded":
            ok = self.holds_unloaded
            return Probe(kind, 1, requests, 5.0, 5.0 if ok else 0.0, 1.0 if ok else 0.0, ok)
        if kind == "capacity":
            return Probe(kind, point.load, requests, self.capacity, 0.0, 0.0, False)
        ok = point.load <= self.holds_to
        return Probe(kind, point.load, requests, point.load, point.load if ok else 0.0, 1.0 if ok else 0.3, ok)


def test_finds_the_highest_rate_within_the_tolerance():
    server = ModelServer(capacity=40.0, holds_to=23.0)
    outcome = search(server, SETTINGS)
    held = [p.load for p in outcome.probes if p.kind == "rate" and p.passed]
    failed = [p.load for p in outcome.probes if p.kind == "rate" and not p.passed]
    assert outcome.status == "searched"
    assert max(held) <= 23.0 < min(failed)
    assert min(failed) - max(held) <= SETTINGS.tolerance * min(failed)
    assert [c[0] for c in server.calls[:3]] == ["unloaded", "capacity", "rate"]
    assert server.calls[2][1].rate == 40.0  # the capacity is tried first


def test_stops_at_the_capacity_when_it_holds():
    server = ModelServer(capacity=40.0, holds_to=100.0)
    outcome = search(server, SETTINGS)
    assert [p.load for p in outcome.probes if p.kind == "rate"] == [40.0]
    assert outcome.detail.startswith("held up to 40 req/s")


def test_a_config_missing_the_slo_unloaded_is_done_after_one_probe():
    server = ModelServer(capacity=40.0, holds_to=20.0, holds_unloaded=False)
    outcome = search(server, SETTINGS)
    assert outcome.status == "slo-unmet" and len(server.calls) == 1


def test_a_config_whose_capacity_cannot_win_is_pruned_before_the_rate_search():
    server = ModelServer(capacity=10.0, holds_to=8.0)
    outcome = search(server, SETTINGS, beat=12.0)
    assert outcome.status == "pruned" and [c[0] for c in server.calls] == ["unloaded", "capacity"]
    assert "cannot beat the best goodput so far" in outcome.detail


def test_rate_probes_send_about_max_probe_s_of_arrivals_within_bounds():
    s = SearchSettings(probe_requests=64, min_rate_requests=16, max_probe_s=2.0)
    assert [s.rate_requests(r) for r in (1.0, 20.0, 100.0)] == [16, 40, 64]


def test_a_config_failing_below_the_best_goodput_is_pruned_during_the_rate_search():
    server = ModelServer(capacity=30.0, holds_to=8.0)
    outcome = search(server, SETTINGS, beat=12.0)
    assert outcome.status == "pruned" and "not above the best goodput" in outcome.detail
    # 30 and 15 fail above 12, 7.5 holds, 11.25 fails: no rate above 12 can hold any more
    assert [p.load for p in outcome.probes if p.kind == "rate"] == [30.0, 15.0, 7.5, 11.25]


@pytest.mark.parametrize("kw", [dict(probe_requests=0), dict(tolerance=1.0), dict(max_probe_s=0.0), dict(max_rate_probes=0)])
def test_bad_search_settings(kw):
    with pytest.raises(ValueError):
        SearchSettings(**kw)
