"""Arrival schedules: exact constant spacing, seeded Poisson processes with the right statistics."""

from __future__ import annotations

import math
import statistics

import pytest

from pikaserve.bench.schedule import Arrival, ArrivalSchedule, arrival_offsets


def test_constant_arrivals_are_evenly_spaced_from_zero() -> None:
    assert arrival_offsets(5, 4.0, Arrival.CONSTANT) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert arrival_offsets(3, math.inf, Arrival.POISSON) == [0.0, 0.0, 0.0]  # inf: all at once
    assert arrival_offsets(0, 1.0) == []


def test_poisson_is_seeded_and_extends_without_changing_the_past() -> None:
    a = arrival_offsets(200, 10.0, Arrival.POISSON, seed=7)
    assert a == arrival_offsets(200, 10.0, Arrival.POISSON, seed=7)
    assert a != arrival_offsets(200, 10.0, Arrival.POISSON, seed=8)
    assert arrival_offsets(500, 10.0, Arrival.POISSON, seed=7)[:200] == a
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    lazy = ArrivalSchedule(10.0, Arrival.POISSON, 7)
    assert [lazy(i) for i in (150, 3, 199)] == [a[150], a[3], a[199]]


def test_poisson_gaps_are_exponential_with_mean_one_over_rate() -> None:
    rate, n = 50.0, 20_000
    offsets = arrival_offsets(n + 1, rate, Arrival.POISSON, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    mean = statistics.fmean(gaps)
    # Standard error of the mean is (1/rate)/sqrt(n) = 0.7%: 3% is over four standard errors.
    assert mean == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, abs=0.04)  # coefficient of variation 1
    # Kolmogorov-Smirnov distance to the exponential CDF; 1.95/sqrt(n) is the 0.1% critical value.
    ordered = sorted(gaps)
    ks = max(max(abs((i + 1) / n - (1 - math.exp(-rate * g))), abs(i / n - (1 - math.exp(-rate * g)))) for i, g in enumerate(ordered))
    assert ks < 1.95 / math.sqrt(n)
    # Counts in 1-second windows are Poisson(rate): mean and variance both about `rate`.
    counts = [0] * int(offsets[-1])
    for t in offsets:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(rate, rel=0.05)
    assert statistics.variance(counts) == pytest.approx(rate, rel=0.25)  # sd of the estimate is ~7%; a constant process has 0


def test_bad_rates_are_rejected() -> None:
    for rate in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            arrival_offsets(3, rate)
    with pytest.raises(ValueError):
        arrival_offsets(-1, 1.0)
