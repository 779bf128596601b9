"""One streamed request against the fake server: timing of content chunks and error kinds."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import httpx
import pytest

from pikaserve.bench.client import ServerTokenizer, first_model, stream_request
from pikaserve.bench.records import RequestRecord

from .conftest import JITTER
from .fake_openai import FakeOpenAIServer, Plan

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def send(url: str, body: dict[str, Any] = CHAT, path: str = "/v1/chat/completions", timeout: float = 10.0, **kw: Any) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) as client:
            return await stream_request(client, path, body, index=0, server=0, **kw)

    return asyncio.run(go())


def test_ttft_itl_tpot_from_content_chunks(fake_server: Callable[..., FakeOpenAIServer]) -> None:
    # The role chunk comes at once; content at 150 ms, then two 80 ms gaps; usage reports 6 tokens.
    plan = Plan(chunks=[(0.150, "Hel"), (0.080, "lo, "), (0.080, "world")], usage_tokens=6)
    server = fake_server(lambda body: plan)
    r = send(server.url)
    assert r.ok and r.text == "Hello, world" and r.finish_reason == "stop"
    for seen, sent in zip(r.chunk_times, (0.150, 0.230, 0.310)):  # each chunk timed when it arrives
        assert sent <= seen < sent + JITTER
    assert r.ttft == r.chunk_times[0] and r.ttft >= 0.150  # the role chunk (~0 ms) does not count
    assert r.itls == pytest.approx([r.chunk_times[1] - r.chunk_times[0], r.chunk_times[2] - r.chunk_times[1]], abs=1e-12)
    assert all(0.080 - JITTER < gap < 0.080 + JITTER for gap in r.itls)  # not ~0 (buffered) nor ~150 (role gap)
    assert (r.output_tokens, r.tokens_from_usage, r.prompt_tokens) == (6, True, 7)
    assert 0.310 <= r.e2e < 0.310 + JITTER and r.e2e >= r.chunk_times[-1]
    # TPOT = (E2E - TTFT) / (tokens - 1) with tokens from usage (6), not the 3 chunks.
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 5, rel=1e-12)
    assert 0.160 / 5 - JITTER / 5 < r.tpot < (0.160 + JITTER) / 5


def test_tokens_are_counted_from_chunks_without_usage(fake_server: Callable[..., FakeOpenAIServer]) -> None:
    server = fake_server(lambda body: Plan(chunks=[(0.0, "a"), (0.0, ""), (0.0, "b"), (0.0, "c")], usage_tokens=None))
    r = send(server.url)
    assert r.ok and (r.output_tokens, r.tokens_from_usage, len(r.chunk_times)) == (3, False, 3)  # the empty chunk is no token


def test_completions_endpoint_text(fake_server: Callable[..., FakeOpenAIServer]) -> None:
    server = fake_server(lambda body: Plan(chunks=[(0.0, "4"), (0.0, "2")], usage_tokens=2))
    r = send(server.url, {"model": "m", "prompt": "6*7=", "stream": True}, path="/v1/completions")
    assert r.ok and r.text == "42" and len(r.chunk_times) == 2


@pytest.mark.parametrize(
    ("plan", "kind"),
    [
        (Plan(status=500), "http_500"),
        (Plan(status=429), "http_429"),
        (Plan(chunks=[(0.0, "a"), (0.0, "b"), (0.0, "c")], abort_after=1), "aborted"),  # connection cut mid-stream
        (Plan(send_done=False, finish_reason=None), "aborted"),  # clean close, but the answer never finished
        (Plan(error_event=True), "stream_error"),
        (Plan(chunks=[(1.0, "late")]), "timeout"),
    ],
)
def test_error_kinds(fake_server: Callable[..., FakeOpenAIServer], plan: Plan, kind: str) -> None:
    server = fake_server(lambda body: plan)
    r = send(server.url, timeout=0.3)
    assert not r.ok and r.error == kind and r.valid is None
    assert r.end >= r.start


def test_connection_refused_is_its_own_kind(closed_port_url: str) -> None:
    r = send(closed_port_url)
    assert r.error == "connect"


def test_finish_reason_without_done_is_complete(fake_server: Callable[..., FakeOpenAIServer]) -> None:
    server = fake_server(lambda body: Plan(send_done=False))
    assert send(server.url).ok


def test_validity_is_checked_on_success_only(fake_server: Callable[..., FakeOpenAIServer]) -> None:
    answers = iter(['{"a": 1}', "{nope", '{"a": 1}'])
    server = fake_server(lambda body: Plan(chunks=[(0.0, next(answers))]))
    check = lambda v: isinstance(v, dict) and v.get("a") == 1  # noqa: E731
    assert send(server.url, checker=check).valid is True
    assert send(server.url, checker=check).valid is False
    assert send(server.url).valid is None  # no checker: not checked


def test_models_and_tokenize(fake_server: Callable[..., FakeOpenAIServer], closed_port_url: str) -> None:
    server = fake_server(model="tiny", tokenize=lambda text: len(text.split()) + 1)
    assert first_model(server.url) == "tiny"
    with ServerTokenizer(server.url, "tiny") as tok:
        assert tok.available and tok.count("a b c") == 4
    without = fake_server()
    with ServerTokenizer(without.url, "fake-model") as tok:
        assert not tok.available  # 404: fall back to approximate lengths
    with pytest.raises(ValueError, match="--model"):
        first_model(closed_port_url, timeout_s=2)
