"""Prometheus metrics of one server app, on its own CollectorRegistry.

Latency histograms and token counters are recorded by the request handlers as outputs arrive.
Engine state (running/waiting requests, KV usage, prefix-cache, forward-pass and speculative
decoding counters) is read at scrape time by a collector, so the engine loop does no metrics
work at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pikaserve.engine.outputs import EngineStats

# Latency buckets down to 1 ms: a Pika answer on a GPU takes a few ms end to end.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    """Reads the engine's own gauges and counters when /metrics is scraped."""

    def __init__(self, get_stats: Callable[[], EngineStats | None], model_name: str,
                 prefix: str, get_replica_stats: Callable[[], dict[str, EngineStats]] | None
                 ) -> None:
        self.get_stats = get_stats
        self.get_replica_stats = get_replica_stats
        self.prefix = prefix
        self.model_name = model_name

    def _series(self) -> list[tuple[list[str], EngineStats]]:
        """(label values, stats): the engine's, or one per replica (summed by a query)."""
        if self.get_replica_stats is not None:
            return [([self.model_name, replica], stats)
                    for replica, stats in sorted(self.get_replica_stats().items())]
        stats = self.get_stats()
        return [] if stats is None else [([self.model_name], stats)]

    def collect(self) -> Iterator[Metric]:
        series, prefix = self._series(), self.prefix
        if not series:  # still loading: export nothing rather than made-up zeros
            return
        names = ["model_name"] if self.get_replica_stats is None else ["model_name", "replica"]

        def family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
                   doc: str, value: Callable[[EngineStats], float]) -> Metric:
            f = kind(name, doc, labels=names)
            for values, stats in series:
                f.add_metric(values, value(stats))
            return f

        def gauge(name: str, doc: str, value: Callable[[EngineStats], float]) -> Metric:
            return family(GaugeMetricFamily, name, doc, value)

        def counter(name: str, doc: str, value: Callable[[EngineStats], float]) -> Metric:
            return family(CounterMetricFamily, name, doc, value)

        # a stats snapshot may be one step stale, which is fine for a scrape
        yield gauge(f"{prefix}:num_requests_running", "Requests in the running batch.",
                    lambda s: s.num_running)
        yield gauge(f"{prefix}:num_requests_waiting", "Requests waiting to be scheduled.",
                    lambda s: s.num_waiting)
        yield gauge(f"{prefix}:kv_cache_usage_perc",
                    "Fraction of KV blocks held by requests (1 = full).", lambda s: s.kv_usage)
        yield counter(f"{prefix}:prefix_cache_queries",
                      "Prompt tokens looked up in the prefix cache.",
                      lambda s: s.prefix_cache_queries)
        yield counter(f"{prefix}:prefix_cache_hits",
                      "Prompt tokens found in the prefix cache.", lambda s: s.prefix_cache_hits)
        yield gauge(f"{prefix}:kv_offload_blocks",
                    "Blocks held by the prefix cache's second tier (kv_offloading_size).",
                    lambda s: s.kv_offload_blocks)
        yield counter(f"{prefix}:kv_offload_stored_blocks",
                      "Cached blocks copied into the second tier when evicted.",
                      lambda s: s.kv_offload_stored)
        yield counter(f"{prefix}:kv_offload_restored_blocks",
                      "Blocks copied back from the second tier on a prefix hit.",
                      lambda s: s.kv_offload_restored)
        yield counter(f"{prefix}:model_forward", "Model forward passes.",
                      lambda s: s.num_forward_passes)
        yield counter(f"{prefix}:spec_decode_num_drafts",
                      "Speculative proposals checked.", lambda s: s.spec_decode_num_drafts)
        yield counter(f"{prefix}:spec_decode_num_draft_tokens",
                      "Tokens of the speculative proposals checked.",
                      lambda s: s.spec_decode_num_draft_tokens)
        yield counter(f"{prefix}:spec_decode_num_accepted_tokens",
                      "Proposed tokens accepted.", lambda s: s.spec_decode_num_accepted_tokens)
        per_pos = CounterMetricFamily(f"{prefix}:spec_decode_num_accepted_tokens_per_pos",
                                      "Proposed tokens accepted, by position in the proposal.",
                                      labels=names + ["position"])
        for values, stats in series:
            for pos, n in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
                per_pos.add_metric(values + [str(pos)], n)
        yield per_pos


class ServerMetrics:
    def __init__(self, model_name: str, get_stats: Callable[[], EngineStats | None],
                 prefix: str = "pikaserve",
                 get_replica_stats: Callable[[], dict[str, EngineStats]] | None = None) -> None:
        """`get_replica_stats`: the engine gauges and counters come one series per replica
        (label `replica`) instead of from `get_stats`."""
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets).labels(model_name)

        self.ttft = hist(f"{prefix}:time_to_first_token_seconds",
                         "Seconds from request receipt to the first output token.",
                         LATENCY_BUCKETS)
        self.itl = hist(f"{prefix}:inter_token_latency_seconds",
                        "Seconds between consecutive outputs of a request.",
                        TOKEN_LATENCY_BUCKETS)
        self.e2e = hist(f"{prefix}:e2e_request_latency_seconds",
                        "Seconds from request receipt to its last output.", LATENCY_BUCKETS)
        self.queue = hist(f"{prefix}:request_queue_time_seconds",
                          "Seconds a request waited in the engine before its first step.",
                          LATENCY_BUCKETS)
        self.prompt_tokens = Counter(f"{prefix}:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter(f"{prefix}:generation_tokens", "Tokens generated.",
                                         labels, registry=r).labels(model_name)
        self._success = Counter(f"{prefix}:request_success", "Requests that finished.",
                                labels + ["finished_reason"], registry=r)
        self._head_answers = Counter(f"{prefix}:head_answers",
                                     "Requests answered by a classification head.",
                                     labels + ["head"], registry=r)
        self.model_name = model_name
        r.register(_EngineCollector(get_stats, model_name, prefix, get_replica_stats))

    def success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def head_answer(self, head: str, seconds: float, num_prompt_tokens: int) -> None:
        """A request answered by a head: its latency is both time to first token and e2e."""
        self._head_answers.labels(self.model_name, head).inc()
        self.ttft.observe(seconds)
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.success("stop")

    def render(self) -> bytes:
        return generate_latest(self.registry)
