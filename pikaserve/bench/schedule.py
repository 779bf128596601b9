"""Arrival times for open-loop load (`--rate`): constant spacing or a seeded Poisson process.

Offsets are seconds from the start of a load point; the first request arrives at 0. The i-th
offset never depends on how many offsets were asked for, so a schedule can be extended while a
duration-bounded run goes on, and the same seed always gives the same arrivals.
"""

from __future__ import annotations

import math
import random
from enum import Enum


class Arrival(str, Enum):
    CONSTANT = "constant"  # exactly 1/rate apart
    POISSON = "poisson"  # exponential gaps with mean 1/rate (memoryless, like independent users)


def arrival_offsets(n: int, rate: float, kind: Arrival = Arrival.POISSON, seed: int = 0) -> list[float]:
    """Offsets (seconds) of `n` arrivals at `rate` requests/s; `rate=inf` sends everything at once."""
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    if kind is Arrival.CONSTANT:
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


class ArrivalSchedule:
    """Arrival offsets looked up by request number, generated on demand (for unbounded runs)."""

    def __init__(self, rate: float, kind: Arrival, seed: int) -> None:
        self.rate, self.kind, self.seed = rate, kind, seed
        self._offsets: list[float] = []

    def __call__(self, i: int) -> float:
        if i >= len(self._offsets):
            # Regenerating a longer prefix gives identical earlier values (see module docstring).
            self._offsets = arrival_offsets(max(2 * i + 1, 64), self.rate, self.kind, self.seed)
        return self._offsets[i]
