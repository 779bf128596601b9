"""The load loop of `pikaserve bench`: closed loop (fixed concurrency) or open loop (arrival
schedule), over a sweep of load points, against one server or several interleaved fairly.

Interleaving (--compare): the request sequence is cut into rounds of `round_size` requests. In each
round every server gets the same requests under the same load, one server at a time, and the
server that goes first rotates from round to round (round r starts with server r mod K). No
server is ever measured while another is loaded, so servers sharing one CPU or GPU do not slow
each other down, and slow drift of the machine (heat, other users) is spread evenly over them.
A server's throughput is measured over the time its own rounds took.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Protocol

import httpx

from pikaserve.bench.client import ServerTokenizer, auth_headers, first_model, stream_request
from pikaserve.bench.config import BenchConfig, LoadPoint
from pikaserve.bench.records import RequestRecord
from pikaserve.bench.schedule import ArrivalSchedule
from pikaserve.bench.stats import Metrics, compute_metrics
from pikaserve.bench.workloads import SYNTHETIC, BenchRequest, Workload, check_endpoint, requests_per_point, workload_from_config


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    label: str
    model: str


@dataclass(slots=True)
class ServerRun:
    """One server at one load point."""

    target: Target
    records: list[RequestRecord]
    active_s: float  # time this server was under load (the sum of its rounds)
    metrics: Metrics


@dataclass(slots=True)
class PointRun:
    point: LoadPoint
    servers: list[ServerRun]


class ProgressHook(Protocol):
    def start_point(self, point: LoadPoint, total: int | None) -> None: ...

    def advance(self) -> None: ...


def default_round_size(point: LoadPoint) -> int:
    """Requests per server turn with --compare: long enough that ramp-up and drain at the edges of
    a turn are a small part of it, short enough that the servers alternate often."""
    if point.rate is None:
        return 4 * (point.concurrency or 1)
    if math.isinf(point.rate):
        return 4 * (point.concurrency or 4)
    return max(4, math.ceil(2 * point.rate))  # about two seconds of arrivals


class Runner:
    """Runs the configured load points against the targets (one AsyncClient per server)."""

    def __init__(self, config: BenchConfig, targets: list[Target], workload: Workload, progress: ProgressHook | None = None) -> None:
        self.config, self.targets, self.workload, self.progress = config, targets, workload, progress
        self._overrides: dict[str, object] = {
            **({"max_tokens": config.max_tokens} if config.max_tokens is not None else {}),
            **({"temperature": config.temperature} if config.temperature is not None else {}),
            **({"ignore_eos": True} if config.ignore_eos else {}),
            **config.extra_body,
        }
        self._clients: list[httpx.AsyncClient] = []
        self.warmup_errors: list[dict[str, int]] = []

    async def run(self) -> list[PointRun]:
        caps = [p.concurrency for p in self.config.points]
        limit = None if None in caps else max(c for c in caps if c is not None) + 2  # None: unlimited
        self._clients = [
            httpx.AsyncClient(
                base_url=t.url,
                headers=auth_headers(self.config.api_key),
                timeout=httpx.Timeout(self.config.timeout_s, connect=min(self.config.timeout_s, 30.0)),
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
                trust_env=False,  # never time a request through a proxy from the environment
            )
            for t in self.targets
        ]
        try:
            await self._warmup()
            results, index_base = [], self.config.first_index
            for point in self.config.points:
                results.append(await self._run_point(point, index_base))
                # Continue the index so a sweep does not resend (and prefix-cache) earlier prompts.
                index_base += max(len(s.records) for s in results[-1].servers)
            return results
        finally:
            await asyncio.gather(*(c.aclose() for c in self._clients))

    async def _send(self, server: int, index: int, request: BenchRequest, scheduled: float | None) -> RequestRecord:
        body = request.body(self.config.endpoint, self.targets[server].model)
        body.update(self._overrides)
        if self.config.server_bodies:
            body.update(self.config.server_bodies[server])
        record = await stream_request(
            self._clients[server], self.config.path, body, index=index, server=server, scheduled=scheduled, checker=request.checker
        )
        if self.progress is not None and index >= 0:
            self.progress.advance()
        return record

    async def _run_slice(
        self,
        server: int,
        items: Iterable[tuple[int, BenchRequest]],
        point: LoadPoint,
        schedule: ArrivalSchedule | None,
        index_base: int,
        deadline: float | None,
    ) -> list[RequestRecord]:
        """Send `items` to one server under `point`'s load; stop issuing at `deadline`."""
        if schedule is None:  # closed loop: `concurrency` workers share one iterator
            records: list[RequestRecord] = []
            pending = iter(items)

            async def worker() -> None:
                for index, request in pending:
                    if deadline is not None and time.perf_counter() >= deadline:
                        return
                    records.append(await self._send(server, index, request, None))

            await asyncio.gather(*(worker() for _ in range(point.concurrency or 1)))
            return records

        cap = asyncio.Semaphore(point.concurrency) if point.concurrency is not None else None

        async def capped(index: int, request: BenchRequest, due: float) -> RequestRecord:
            if cap is None:
                return await self._send(server, index, request, due)
            async with cap:  # waiting here is client-side queueing, recorded as queue_wait
                return await self._send(server, index, request, due)

        tasks: list[asyncio.Task[RequestRecord]] = []
        base, first = time.perf_counter(), None
        for index, request in items:
            offset = schedule(index - index_base)
            first = offset if first is None else first
            due = base + offset - first  # a slice starts with its own first arrival
            if deadline is not None and due >= deadline:
                break
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(capped(index, request, due)))
        return list(await asyncio.gather(*tasks))

    async def _run_point(self, point: LoadPoint, index_base: int) -> PointRun:
        cfg, k_servers = self.config, len(self.targets)
        n = cfg.num_requests
        schedule = ArrivalSchedule(point.rate, cfg.arrival, cfg.seed) if point.rate is not None else None
        if self.progress is not None:
            self.progress.start_point(point, None if n is None else n * k_servers)
        records: list[list[RequestRecord]] = [[] for _ in self.targets]
        active = [0.0] * k_servers
        deadline = time.perf_counter() + cfg.duration_s if cfg.duration_s is not None else None
        size = cfg.round_size or default_round_size(point)
        issued = 0
        for round_no in itertools.count():
            if (n is not None and issued >= n) or (deadline is not None and time.perf_counter() >= deadline):
                break
            if k_servers == 1:  # nothing to alternate with: one slice, stopped by the deadline itself
                indices: Iterable[int] = itertools.count(index_base) if n is None else range(index_base, index_base + n)
            else:  # whole rounds only, so every server gets exactly the same requests
                indices = range(index_base + issued, index_base + issued + (size if n is None else min(size, n - issued)))
            for server in ((round_no + j) % k_servers for j in range(k_servers)):
                items = ((i, self.workload.request(i)) for i in indices)
                started = time.perf_counter()
                part = await self._run_slice(server, items, point, schedule, index_base, deadline if k_servers == 1 else None)
                active[server] += time.perf_counter() - started
                records[server].extend(part)
            issued = len(records[0])  # every server got the same requests; server 0 stands for all
            if k_servers == 1:
                break  # its one slice has run to the count or the deadline
        return PointRun(
            point,
            [
                ServerRun(target, sorted(recs, key=lambda r: r.index), secs, compute_metrics(recs, secs, cfg.slos))
                for target, recs, secs in zip(self.targets, records, active)
            ],
        )

    async def _warmup(self) -> None:
        """Warmup requests to each server in turn, at the first point's concurrency; not recorded."""
        warmup = self.workload.warmup
        concurrency = min(len(warmup), self.config.points[0].concurrency or 1) if warmup else 1
        for server in range(len(self.targets)):
            items = ((-1 - i, request) for i, request in enumerate(warmup))  # negative: not measured
            part = await self._run_slice(server, items, LoadPoint(concurrency=concurrency), None, 0, None)
            self.warmup_errors.append(dict(Counter(r.error for r in part if r.error is not None)))


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    workload: Workload
    targets: list[Target]
    points: list[PointRun]
    warmup_errors: list[dict[str, int]]  # per server
    started_at: str  # ISO 8601, UTC


def resolve_targets(config: BenchConfig) -> list[Target]:
    """Label and model of every server (--model, else the first id of its GET /v1/models)."""
    return [
        Target(url, config.label(i), config.model_for(i) or first_model(url, config.api_key))
        for i, url in enumerate(config.urls)
    ]


def run_bench(config: BenchConfig, progress: ProgressHook | None = None) -> BenchResult:
    """The whole benchmark: resolve models, build the workload (tokenizing on the first server), run."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    targets = resolve_targets(config)
    tokenizer = ServerTokenizer(targets[0].url, targets[0].model, config.api_key) if config.workload in SYNTHETIC else None
    try:
        workload = workload_from_config(config, tokenizer.count if tokenizer is not None and tokenizer.available else None)
        check_endpoint(workload, config.endpoint)
        config = dataclasses.replace(config, num_requests=requests_per_point(workload, config))
    finally:
        if tokenizer is not None:
            tokenizer.close()
    runner = Runner(config, targets, workload, progress)
    points = asyncio.run(runner.run())
    return BenchResult(config, workload, targets, points, runner.warmup_errors, started_at)
