"""Metric math for `pikaserve bench`: percentiles, summaries, SLOs, goodput and throughput.

Pure functions over `RequestRecord`s: no I/O and no clocks, so every number in a report can be
checked by hand. Latency summaries are in milliseconds; records keep seconds.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from pikaserve.bench.records import RequestRecord

SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation between closest ranks.

    Same as numpy's default (`method="linear"`): rank = p/100 * (n - 1) into the sorted values.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """Distribution of one latency metric, in milliseconds."""

    count: int
    mean: float
    median: float
    p90: float
    p99: float
    max: float
    min: float

    STATS = ("mean", "median", "p90", "p99", "max")

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Summary | None:
        """Summarise values given in seconds (None when there are none)."""
        if not values:
            return None
        ms = [v * 1e3 for v in values]
        return cls(
            count=len(ms),
            mean=math.fsum(ms) / len(ms),
            median=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
            max=max(ms),
            min=min(ms),
        )


@dataclass(frozen=True, slots=True)
class Slo:
    """A service-level objective: `metric` (ttft, tpot, itl or e2e) must be <= `limit_s`."""

    metric: str
    limit_s: float

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit_s * 1e3:g}ms"


def parse_duration(text: str) -> float:
    """'50ms' / '0.2s' / '300us' / '50' (bare numbers are milliseconds) -> seconds."""
    text = text.strip().lower()
    for unit in ("us", "ms", "s"):  # "ms" and "us" before "s": both end with it
        if text.endswith(unit):
            number, scale = text[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = text, _UNITS["ms"]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (examples: 50ms, 0.2s, 300us)") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"duration must be positive and finite: {text!r}")
    return value * scale


def parse_slos(text: str | None) -> tuple[Slo, ...]:
    """Parse `ttft=50ms,e2e=200ms` into SLOs."""
    if not text:
        return ()
    slos: dict[str, Slo] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC=DURATION with METRIC in {', '.join(SLO_METRICS)}")
        slos[name] = Slo(name, parse_duration(value))
    return tuple(slos.values())


def meets_slos(record: RequestRecord, slos: Iterable[Slo]) -> bool:
    """A request is good when it succeeded, its answer is not invalid, and it meets every SLO.

    A metric that does not exist for the request (TPOT/ITL of a one-token answer) is met vacuously.
    """
    if not record.ok or record.valid is False:
        return False
    for slo in slos:
        if slo.metric == "ttft":
            value = record.ttft
        elif slo.metric == "tpot":
            value = record.tpot
        elif slo.metric == "itl":
            value = max(record.itls, default=None)
        else:
            value = record.e2e
        if value is not None and value > slo.limit_s:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Metrics:
    """Everything reported for one server at one load point."""

    requests: int  # issued
    completed: int
    failed: int
    errors: dict[str, int]  # error kind -> count
    duration_s: float  # time the server was under load (sum of its rounds)
    request_throughput: float  # completed requests / duration_s
    output_throughput: float  # output tokens of completed requests / duration_s
    input_tokens: int  # sum of usage.prompt_tokens over completed requests that report it
    output_tokens: int
    goodput: float | None  # good requests / duration_s; None without SLOs
    slo_attainment: float | None  # good requests / issued requests; None without SLOs
    json_checked: int
    json_valid: int
    json_validity: float | None  # json_valid / json_checked
    ttft: Summary | None
    itl: Summary | None
    tpot: Summary | None
    e2e: Summary | None
    queue_wait: Summary | None

    LATENCIES = ("ttft", "itl", "tpot", "e2e", "queue_wait")


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slos: Sequence[Slo] = ()) -> Metrics:
    """Aggregate records of one server at one load point. Latencies come from successful requests only."""
    done = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    checked = [r for r in done if r.valid is not None]
    output_tokens = sum(r.output_tokens for r in done)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    good = sum(meets_slos(r, slos) for r in records) if slos else None
    return Metrics(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(output_tokens),
        input_tokens=sum(r.prompt_tokens or 0 for r in done),
        output_tokens=output_tokens,
        goodput=None if good is None else per_s(good),
        slo_attainment=None if good is None or not records else good / len(records),
        json_checked=len(checked),
        json_valid=sum(1 for r in checked if r.valid),
        json_validity=(sum(1 for r in checked if r.valid) / len(checked)) if checked else None,
        ttft=Summary.of_seconds([t for r in done if (t := r.ttft) is not None]),
        itl=Summary.of_seconds([gap for r in done for gap in r.itls]),
        tpot=Summary.of_seconds([t for r in done if (t := r.tpot) is not None]),
        e2e=Summary.of_seconds([r.e2e for r in done]),
        queue_wait=Summary.of_seconds([w for r in done if (w := r.queue_wait) is not None]),
    )


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline
