"""Metric math of pikaserve bench, checked by hand on synthetic records (no server, no clock)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pikaserve.bench.records import RequestRecord
from pikaserve.bench.stats import Slo, Summary, compute_metrics, meets_slos, parse_duration, parse_slos, percentile, ratio


def record(chunks: list[float], e2e: float, tokens: int | None = None, index: int = 0, **kw: object) -> RequestRecord:
    """A successful request sent at t=100 s with content chunks at the given offsets."""
    r = RequestRecord(index=index, server=0, start=100.0, end=100.0 + e2e, chunk_times=list(chunks), **kw)  # type: ignore[arg-type]
    r.output_tokens = len(chunks) if tokens is None else tokens
    return r


def test_percentile_is_linear_interpolation_like_numpy() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)  # rank 8.1 -> 9 + 0.1 * (10 - 9)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    rng = random.Random(1)
    for n in (2, 3, 17, 100):
        data = [rng.expovariate(1.0) for _ in range(n)]
        for p in (1, 50, 90, 99, 99.9):
            assert percentile(data, p) == pytest.approx(float(np.percentile(data, p)), rel=1e-12)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_in_milliseconds() -> None:
    s = Summary.of_seconds([0.010, 0.020, 0.030, 0.040])
    assert s is not None
    assert (s.count, s.mean, s.median, s.max, s.min) == (4, pytest.approx(25.0), pytest.approx(25.0), pytest.approx(40.0), pytest.approx(10.0))
    assert s.p90 == pytest.approx(37.0)  # rank 2.7 -> 30 + 0.7 * 10
    assert s.p99 == pytest.approx(39.7)
    assert Summary.of_seconds([]) is None


def test_record_metrics() -> None:
    # Content chunks at 50, 70, 100 ms; stream ends at 110 ms; usage says 5 tokens (multi-token chunks).
    r = record([0.050, 0.070, 0.100], e2e=0.110, tokens=5)
    assert r.ttft == pytest.approx(0.050)
    assert r.itls == pytest.approx([0.020, 0.030])
    assert r.e2e == pytest.approx(0.110)
    assert r.tpot == pytest.approx((0.110 - 0.050) / 4)
    assert record([0.05], e2e=0.06).tpot is None  # one token: no TPOT
    assert record([], e2e=0.06).ttft is None
    waited = record([0.01], e2e=0.02, scheduled=99.75)
    assert waited.queue_wait == pytest.approx(0.25)
    assert record([0.01], e2e=0.02, scheduled=100.5).queue_wait == 0.0  # sent early: no wait
    assert record([0.01], e2e=0.02).queue_wait is None


def test_compute_metrics_by_hand() -> None:
    ok1 = record([0.010, 0.030, 0.060], e2e=0.070, tokens=3, prompt_tokens=11, valid=True)
    ok2 = record([0.020, 0.030], e2e=0.050, tokens=4, index=1, prompt_tokens=9, valid=False)
    bad = RequestRecord(index=2, server=0, start=0.0, end=0.5, error="http_500")
    cut = RequestRecord(index=3, server=0, start=0.0, end=0.5, error="aborted", chunk_times=[0.4])
    bad2 = RequestRecord(index=4, server=0, start=0.0, end=0.5, error="http_500")
    m = compute_metrics([ok1, ok2, bad, cut, bad2], duration_s=2.0)
    assert (m.requests, m.completed, m.failed) == (5, 2, 3)
    assert m.errors == {"aborted": 1, "http_500": 2}
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.5)  # (3 + 4) tokens / 2 s
    assert (m.input_tokens, m.output_tokens) == (20, 7)
    assert (m.json_checked, m.json_valid, m.json_validity) == (2, 1, 0.5)
    assert m.ttft is not None and m.ttft.mean == pytest.approx(15.0) and m.ttft.max == pytest.approx(20.0)
    # ITL pools every gap of every successful request: 20, 30, 10 ms (the aborted one is left out).
    assert m.itl is not None and m.itl.count == 3 and m.itl.mean == pytest.approx(20.0) and m.itl.median == pytest.approx(20.0)
    # TPOT per request: (70-10)/2 = 30 ms and (50-20)/3 = 10 ms.
    assert m.tpot is not None and m.tpot.mean == pytest.approx(20.0) and m.tpot.max == pytest.approx(30.0)
    assert m.e2e is not None and m.e2e.median == pytest.approx(60.0)
    assert m.goodput is None and m.slo_attainment is None and m.queue_wait is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = record([0.010, 0.020], e2e=0.030, tokens=2)
    at_limits = record([0.050, 0.060], e2e=0.119, tokens=2, index=5)  # TTFT exactly at its SLO is good
    slow_first = record([0.080, 0.090], e2e=0.100, tokens=2, index=1)
    slow_tail = record([0.010, 0.150], e2e=0.160, tokens=2, index=2)
    invalid = record([0.010], e2e=0.020, index=3, valid=False)
    failed = RequestRecord(index=4, server=0, start=0.0, end=0.01, error="connect")
    slos = parse_slos("ttft=50ms,e2e=0.12s")
    m = compute_metrics([fast, at_limits, slow_first, slow_tail, invalid, failed], duration_s=0.5, slos=slos)
    assert m.goodput == pytest.approx(2 / 0.5)  # fast and at_limits; invalid answers are never good
    assert m.slo_attainment == pytest.approx(2 / 6)
    assert meets_slos(slow_tail, [Slo("itl", 0.2)]) and not meets_slos(slow_tail, [Slo("itl", 0.1)])
    assert meets_slos(slow_tail, [Slo("tpot", 0.15)]) and not meets_slos(slow_tail, [Slo("tpot", 0.14)])
    assert meets_slos(record([0.01], e2e=0.02), [Slo("tpot", 1e-9), Slo("itl", 1e-9)])  # one token: vacuous


def test_parse_slos_and_durations() -> None:
    assert parse_slos("ttft=50ms,e2e=200ms") == (Slo("ttft", 0.05), Slo("e2e", 0.2))
    assert parse_slos("tpot=300us, itl=1s") == (Slo("tpot", pytest.approx(3e-4)), Slo("itl", 1.0))  # type: ignore[arg-type]
    assert parse_slos(None) == ()
    assert parse_duration("25") == pytest.approx(0.025)  # bare numbers are ms
    for bad in ("latency=5ms", "ttft", "ttft=fast", "ttft=-5ms", "ttft=0"):
        with pytest.raises(ValueError):
            parse_slos(bad)


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
