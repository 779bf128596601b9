"""Configuration of one `pikaserve bench` run: servers, workload, load points and outputs.

`BenchConfig` is the single source of truth; the CLI flags map onto it one to one, and tests
(or a future end-to-end test against `pikaserve serve`) can build it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pikaserve.bench.schedule import Arrival
from pikaserve.bench.stats import Slo

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
WORKLOADS = ("pika", "random", "prefix-repetition", "file")
PIKA_SCHEMA_FORMS = ("json_schema", "json_object", "none")


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One level of load: closed loop at `concurrency`, or open loop at `rate` requests/s.

    In open loop `concurrency` is an optional cap on requests in flight (None: no cap).
    """

    concurrency: int | None = 1
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.rate}")
        if self.rate is None and self.concurrency is None:
            raise ValueError("a load point needs a concurrency or a rate")

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        cap = f", max concurrency {self.concurrency}" if self.concurrency is not None else ""
        return f"rate {'inf' if math.isinf(self.rate) else f'{self.rate:g}'}/s{cap}"

    @property
    def load(self) -> float:
        """The x-axis value of plots: the rate in open loop, else the concurrency."""
        return self.rate if self.rate is not None else float(self.concurrency or 0)


def normalize_url(url: str) -> str:
    """'localhost:8000/v1/' -> 'http://localhost:8000' (endpoint paths are added later)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


@dataclass(frozen=True, slots=True)
class BenchConfig:
    urls: tuple[str, ...]  # first is the baseline; the rest are --compare servers
    labels: tuple[str, ...] = ()  # display names, one per url (default: host:port)
    models: tuple[str, ...] = ()  # one for all servers, or one per server; empty: first of GET /v1/models
    api_key: str | None = None
    endpoint: str = "chat"
    workload: str = "pika"
    # workload parameters
    pika_dir: Path | None = None
    pika_schema: str = "json_schema"  # how to send the answer schema (PIKA_SCHEMA_FORMS); checked either way
    dataset: Path | None = None  # JSONL file for workload "file"
    pika_turns: tuple[Path, ...] = ()  # JSONL turn files sent instead of the bundled Pika turns
    allow_repeats: bool = False  # let a send-once workload (pika) cycle through its requests
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    num_prefixes: int = 4
    prefix_len: int = 256
    suffix_len: int = 32
    num_prompts: int | None = None  # distinct random prompts (default: enough for the whole run)
    ignore_eos: bool | None = None  # default: on for random/prefix-repetition (their lengths are targets)
    max_tokens: int | None = None  # overrides the workload's max_tokens
    temperature: float | None = None  # overrides the workload's temperature
    extra_body: dict[str, object] = field(default_factory=dict)
    # one per server, merged last: the same requests sent several ways (e.g. a floor with
    # max_tokens 1 beside the full answer)
    server_bodies: tuple[dict[str, object], ...] = ()
    # load
    points: tuple[LoadPoint, ...] = (LoadPoint(),)
    arrival: Arrival = Arrival.POISSON
    seed: int = 0
    num_requests: int | None = 100  # per load point and server; None: until --duration
    duration_s: float | None = None  # per load point: no new requests (rounds) after this
    warmup: int = 0  # requests per server before the first load point, not recorded
    # Logical index of the first measured request. A caller that runs several benches against
    # one server (pikaserve tune) continues where the last stopped, so no prompt repeats.
    first_index: int = 0
    round_size: int | None = None  # requests per server turn with --compare (default in runner.round_size)
    timeout_s: float = 300.0
    slos: tuple[Slo, ...] = ()
    # outputs
    output_dir: Path | None = None
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one --url is needed")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
        if self.pika_schema not in PIKA_SCHEMA_FORMS:
            raise ValueError(f"pika schema form must be one of {', '.join(PIKA_SCHEMA_FORMS)}")
        if self.workload == "file" and self.dataset is None:
            raise ValueError("workload 'file' needs --dataset FILE.jsonl")
        if self.labels and len(self.labels) != len(self.urls):
            raise ValueError(f"{len(self.labels)} labels for {len(self.urls)} servers")
        if self.server_bodies and len(self.server_bodies) != len(self.urls):
            raise ValueError(f"{len(self.server_bodies)} server bodies for {len(self.urls)} servers")
        if len(self.models) not in (0, 1, len(self.urls)):
            raise ValueError(f"give one model for all servers or one per server, not {len(self.models)}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound the run with a number of requests, a duration, or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("number of requests must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("duration must be > 0")
        if self.warmup < 0 or (self.round_size is not None and self.round_size < 1):
            raise ValueError("warmup must be >= 0 and round size >= 1")
        if self.first_index < 0:
            raise ValueError("first index must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout must be > 0")
        if not self.points:
            raise ValueError("at least one load point is needed")

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]

    def label(self, server: int) -> str:
        return self.labels[server] if self.labels else self.urls[server].split("://", 1)[-1]

    def model_for(self, server: int) -> str | None:
        if not self.models:
            return None
        return self.models[0] if len(self.models) == 1 else self.models[server]
