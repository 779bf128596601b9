"""What `pikaserve bench` observes about one request, and the per-request metrics derived from it.

A `RequestRecord` holds raw observations only (clock readings, token counts, the answer text);
every latency is a property computed from them, so there is one place that defines each metric.
All times are `time.perf_counter()` seconds; the properties return seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """One streamed request to one server."""

    index: int  # logical request index in the workload (the same request has the same index everywhere)
    server: int  # position of the server in --url/--compare order
    start: float  # perf_counter just before the HTTP request was sent
    end: float = 0.0  # perf_counter when the stream ended ([DONE], close or error)
    scheduled: float | None = None  # perf_counter the arrival schedule asked for (rate mode only)
    chunk_times: list[float] = field(default_factory=list)  # seconds after start of each non-empty content chunk
    output_tokens: int = 0  # usage.completion_tokens when the server reports it, else len(chunk_times)
    prompt_tokens: int | None = None  # usage.prompt_tokens when reported
    tokens_from_usage: bool = False
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None  # error kind (see client.py); None when the request succeeded
    error_detail: str = ""
    valid: bool | None = None  # answer is JSON matching the request's schema; None when not checked

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        """End-to-end latency: send to end of stream."""
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        """Time to first token: send to the first chunk with non-empty content (not the role chunk)."""
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: gaps between consecutive content chunks."""
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (output_tokens - 1)."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def queue_wait(self) -> float | None:
        """Client-side queueing: how late the request was sent compared with its scheduled arrival."""
        if self.scheduled is None:
            return None
        return max(0.0, self.start - self.scheduled)
