"""Past the drain timeout, requests still running end cleanly: a stream with an error event
and [DONE], a plain request with 503; and the engine's KV is back to idle."""

from __future__ import annotations

import json
import threading
import time

import httpx

from .conftest import serve

LONG = {"prompt": "Count slowly:", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def test_requests_running_past_the_drain_timeout_end_cleanly(async_engine):
    results: dict[str, object] = {}
    first_chunk = threading.Event()

    with serve(async_engine, graceful_shutdown_timeout=1.5) as server:
        url = f"{server.url}/v1/completions"

        def stream() -> None:
            events = []
            with httpx.stream("POST", url, json=LONG | {"stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()
            results["stream"] = events

        def plain() -> None:
            results["plain"] = httpx.post(url, json=LONG, timeout=60)

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        assert first_chunk.wait(30)
        started = time.monotonic()
        server.state.begin_shutdown()  # what SIGTERM does, before uvicorn stops listening
        for t in threads:
            t.join(30)
        waited = time.monotonic() - started

    assert waited < 5
    events = results["stream"]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "shutting down" in error["message"]
    plain = results["plain"]
    assert plain.status_code == 503 and "shutting down" in plain.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while not async_engine.is_idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert async_engine.is_idle()
