"""Measuring one load on one server with `pikaserve bench`, for the tuner's search.

The probes of one server continue the workload where the last one stopped (`first_index`), so
a send-once workload (Pika: a robot never sends the same turn twice) never repeats a request
to a server whose prefix cache has already seen it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pikaserve.bench.config import WORKLOADS, BenchConfig, LoadPoint
from pikaserve.bench.runner import run_bench
from pikaserve.bench.schedule import Arrival
from pikaserve.bench.workloads import requests_per_point, workload_from_config
from pikaserve.tune.search import Probe
from pikaserve.tune.space import SloSpec


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What the tuner sends: a bench workload by name, or a JSONL file of request bodies."""

    name: str = "pika"  # pika | random | prefix-repetition | file
    dataset: Path | None = None
    endpoint: str = "chat"
    arrival: Arrival = Arrival.POISSON
    seed: int = 0
    warmup: int = 4  # requests before the first probe of every server, not measured
    timeout_s: float = 60.0
    pika_schema: str = "json_schema"  # how the Pika answer schema is sent (bench's PIKA_SCHEMA_FORMS)

    def bench_config(self, url: str, point: LoadPoint, requests: int, slo: SloSpec, first_index: int, warmup: int) -> BenchConfig:
        return BenchConfig(
            urls=(url,), endpoint=self.endpoint, workload=self.name, dataset=self.dataset, points=(point,),
            arrival=self.arrival, seed=self.seed, num_requests=requests, warmup=warmup, first_index=first_index,
            timeout_s=self.timeout_s, slos=slo.slos, pika_schema=self.pika_schema, plots=False, progress=False,
        )

    def check_supply(self, requests: int) -> None:
        """Fail before any server starts when a send-once workload cannot last one config."""
        config = self.bench_config("http://127.0.0.1", LoadPoint(), requests, SloSpec(()), 0, self.warmup)
        if self.name == "pika":  # the only send-once workload
            requests_per_point(workload_from_config(config, None), config)


def parse_workload(text: str) -> tuple[str, Path | None]:
    """'pika' | 'random' | 'prefix-repetition' | a JSONL file -> (bench workload, dataset)."""
    if text in WORKLOADS and text != "file":
        return text, None
    if not Path(text).is_file():
        raise ValueError(f"--workload {text!r} is neither one of {', '.join(w for w in WORKLOADS if w != 'file')} nor a file")
    return "file", Path(text)


class BenchProbe:
    """Measures loads on one server, in order; call it as the search's `Measure`."""

    def __init__(self, url: str, workload: WorkloadSpec, slo: SloSpec) -> None:
        self.url, self.workload, self.slo = url, workload, slo
        self.next_index = 0
        self._warmup = workload.warmup

    def __call__(self, kind: str, point: LoadPoint, requests: int) -> Probe:
        config = self.workload.bench_config(self.url, point, requests, self.slo, self.next_index, self._warmup)
        run = run_bench(config).points[0].servers[0]
        self.next_index += len(run.records)
        self._warmup = 0  # once per server
        return Probe.of(kind, point, run.metrics, self.slo)
