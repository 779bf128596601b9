"""The bounded search for one config: the highest request rate at which the SLO holds.

Three phases, each cheaper than the next is worth:
1. unloaded: a few requests one at a time. A config that misses the SLO even then has no
   goodput under it at any rate: it is done (this is how a config is pruned at a low load).
2. capacity: closed loop at high concurrency, whose throughput bounds every rate the server
   can sustain. A config whose capacity does not exceed the best goodput found so far cannot
   win: it is pruned before the search.
3. rate search: open-loop probes (Poisson arrivals by default) from the capacity down, halving
   the interval between the highest rate that held and the lowest that did not, until it is
   within the tolerance or the probes run out (vLLM's auto_tune does the same by hand). A
   config that fails at a rate no higher than the best goodput so far cannot win either: it
   is pruned there, before the slow probes at low rates.

A probe passes when at least p% of its requests succeed, give a valid answer and meet every
limit (`SloSpec`). The config's goodput is the best goodput of the rate probes that passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from pikaserve.bench.config import LoadPoint
from pikaserve.bench.stats import Metrics
from pikaserve.tune.space import SloSpec

LATENCY_METRICS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True, slots=True)
class Probe:
    """One load on one server, as measured by `pikaserve bench`."""

    kind: str  # unloaded | capacity | rate
    load: float  # requests in flight (closed loop) or requests/s offered (open loop)
    requests: int
    throughput: float  # completed requests/s
    goodput: float  # requests/s that met the SLO
    attainment: float  # share of the requests that met the SLO
    passed: bool
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> p50/p90/p99
    errors: dict[str, int] = field(default_factory=dict)
    search: int = 0  # which search of its config (1 and up: the --confirm searches)

    @classmethod
    def of(cls, kind: str, point: LoadPoint, metrics: Metrics, slo: SloSpec) -> Probe:
        attainment = metrics.slo_attainment or 0.0
        latency = {
            name: {"p50": s.median, "p90": s.p90, "p99": s.p99}
            for name in LATENCY_METRICS if (s := getattr(metrics, name)) is not None
        }
        return cls(
            kind, point.load, metrics.requests, metrics.request_throughput, metrics.goodput or 0.0, attainment,
            metrics.completed > 0 and attainment * 100 >= slo.percentile - 1e-9, latency, metrics.errors,
        )


@dataclass(frozen=True, slots=True)
class SearchSettings:
    probe_requests: int = 64  # requests of a capacity probe, and at most of a rate probe
    unloaded_requests: int = 8
    capacity_concurrency: int = 32
    min_rate_requests: int = 16  # a rate probe sends about max_probe_s of arrivals, within these bounds
    max_probe_s: float = 15.0
    tolerance: float = 0.1  # stop when (highest failing - highest passing) <= tolerance x highest failing
    max_rate_probes: int = 6

    def __post_init__(self) -> None:
        if min(self.probe_requests, self.unloaded_requests, self.capacity_concurrency, self.min_rate_requests, self.max_rate_probes) < 1:
            raise ValueError("probe sizes, the capacity concurrency and the number of rate probes must be >= 1")
        if not 0 < self.tolerance < 1 or not self.max_probe_s > 0:
            raise ValueError("the tolerance must be in (0, 1) and the probe duration > 0")

    def most_requests(self) -> int:
        """Requests one config can take at most (so a send-once workload can be checked first)."""
        return self.unloaded_requests + self.probe_requests * (1 + self.max_rate_probes)

    def rate_requests(self, rate: float) -> int:
        return max(self.min_rate_requests, min(self.probe_requests, math.ceil(rate * self.max_probe_s)))


@dataclass(slots=True)
class SearchOutcome:
    status: str  # searched | slo-unmet | pruned
    detail: str
    probes: list[Probe]


Measure = Callable[[str, LoadPoint, int], Probe]  # (kind, load, requests) -> probe


def search(measure: Measure, settings: SearchSettings, beat: float = 0.0) -> SearchOutcome:
    """Search one running server; `beat` is the best goodput of the configs before it."""
    probes: list[Probe] = []

    def probe(kind: str, point: LoadPoint, n: int) -> Probe:
        probes.append(measure(kind, point, n))
        return probes[-1]

    if not probe("unloaded", LoadPoint(concurrency=1), settings.unloaded_requests).passed:
        return SearchOutcome("slo-unmet", "misses the SLO with one request at a time", probes)
    capacity = probe("capacity", LoadPoint(concurrency=settings.capacity_concurrency), settings.probe_requests).throughput
    if capacity <= beat:
        return SearchOutcome("pruned", f"capacity {capacity:.3g} req/s cannot beat the best goodput so far, {beat:.3g} req/s", probes)
    passing, failing = 0.0, capacity
    rate = capacity
    for _ in range(settings.max_rate_probes):
        if probe("rate", LoadPoint(concurrency=None, rate=rate), settings.rate_requests(rate)).passed:
            passing = rate
            if rate >= failing:  # the capacity itself held: nothing higher to try
                break
        else:
            failing = rate
            if failing <= beat:  # its goodput stays below a rate that failed: it cannot win
                return SearchOutcome("pruned", f"failed at {rate:.3g} req/s, not above the best goodput so far, {beat:.3g} req/s", probes)
        if failing - passing <= settings.tolerance * failing:
            break
        rate = (passing + failing) / 2
    held = f"held up to {passing:.3g} req/s" if passing else f"held at no rate probed (lowest {failing:.3g} req/s)"
    return SearchOutcome("searched", f"{held}; capacity {capacity:.3g} req/s", probes)
