"""Many clients at once, and clients that leave: outputs stay exact, KV blocks come back."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import httpx
import pytest

from pikaserve.data import pika_messages, pika_turns

from .conftest import metric_values, serve, wait_for

N_CLIENTS = 64
RUNNING = "pikaserve:num_requests_running"
KV = "pikaserve:kv_cache_usage_perc"
SUCCESS = "pikaserve:request_success_total"


@pytest.fixture(scope="module")
def server(async_engine):
    with serve(async_engine, disable_log_requests=True) as s:
        yield s


def requests() -> list[dict]:
    """Pika turns (shared 400-token system prompt) and short chats, various lengths."""
    turns = pika_turns()
    out = []
    for i in range(N_CLIENTS):
        if i % 4 == 3:
            messages = [{"role": "user", "content": f"Count to {i} in words, please."}]
        else:
            messages = pika_messages(turns[i % len(turns)])
        out.append({"messages": messages, "temperature": 0, "max_tokens": 4 + i % 7})
    return out


async def stream_one(client: httpx.AsyncClient, body: dict) -> tuple[str, str, int]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, tokens = [], None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"]:
                c = chunk["choices"][0]
                text.append(c["delta"].get("content") or "")
                finish = c["finish_reason"] or finish
            else:
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), finish, tokens


@pytest.mark.slow
def test_64_concurrent_streams_match_one_at_a_time(server):
    bodies = requests()

    async def all_at_once():
        limits = httpx.Limits(max_connections=N_CLIENTS + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as c:
            return await asyncio.gather(*(stream_one(c, b) for b in bodies))

    together = asyncio.run(all_at_once())
    with httpx.Client(base_url=server.url, timeout=600) as c:
        for body, (text, finish, tokens) in zip(bodies, together):
            alone = c.post("/v1/chat/completions", json=body).json()
            assert text == alone["choices"][0]["message"]["content"]
            assert finish == alone["choices"][0]["finish_reason"]
            assert tokens == alone["usage"]["completion_tokens"]
            assert finish == "stop" or tokens == body["max_tokens"]
    m = metric_values(server.url)
    assert m[RUNNING] == 0 and m[KV] == 0


CLIENT = """
import httpx, sys
body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500, "ignore_eos": True, "stream": True}
with httpx.stream("POST", sys.argv[1] + "/v1/chat/completions", json=body, timeout=None) as r:
    for line in r.iter_lines():
        if '"content"' in line:
            print("streaming", flush=True)
"""


@pytest.mark.slow
def test_client_killed_mid_stream_frees_its_blocks(server):
    idle = metric_values(server.url)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert wait_for(lambda: metric_values(server.url)[KV] > idle[KV], timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert wait_for(lambda: metric_values(server.url)[RUNNING] == 0, timeout=60)
    after = metric_values(server.url)
    assert after[KV] == idle[KV]
    assert after.get(SUCCESS, 0) == idle.get(SUCCESS, 0)  # aborted, not finished


@pytest.mark.slow
def test_non_streaming_client_that_leaves_is_aborted(server):
    idle = metric_values(server.url)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 1500, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        assert wait_for(lambda: metric_values(server.url)[RUNNING] == 1, timeout=30)
    finally:
        sock.close()
    assert wait_for(lambda: metric_values(server.url)[RUNNING] == 0, timeout=60)
    after = metric_values(server.url)
    assert after[KV] == idle[KV]
    assert after.get(SUCCESS, 0) == idle.get(SUCCESS, 0)
