"""A disconnect storm: a few hundred streaming clients at once, about half of them hanging up
at a random moment. Afterwards nothing is running or waiting, every KV block is free (or
merely cached), and a greedy request answers exactly as it did before the storm."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from .conftest import serve

CLIENTS = 300
GREEDY = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12,
          "temperature": 0}


async def _client(url: str, i: int, hang_up: bool, rng: random.Random) -> str:
    body = {"messages": [{"role": "user", "content": f"Story number {i}, please."}],
            "max_tokens": 24, "stream": True, "temperature": 0.8, "seed": i}
    stop_after = rng.randint(0, 6) if hang_up else None
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            events = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if stop_after is not None and events > stop_after:
                        return "hung up"  # leaving the block closes the connection
                    if line == "data: [DONE]":
                        return "done"
    return "ended without [DONE]"


@pytest.mark.slow
def test_a_disconnect_storm_leaks_nothing(async_engine):
    rng = random.Random(0)
    with serve(async_engine, disable_log_requests=True) as server:
        url = f"{server.url}/v1/chat/completions"
        before = httpx.post(url, json=GREEDY, timeout=60).json()["choices"][0]["message"]

        async def storm() -> list[str]:
            hang = [rng.random() < 0.5 for _ in range(CLIENTS)]
            return await asyncio.gather(*(_client(url, i, hang[i], rng)
                                          for i in range(CLIENTS)))

        outcomes = asyncio.run(storm())
        assert set(outcomes) <= {"done", "hung up"}, sorted(set(outcomes))
        assert 0.3 < outcomes.count("hung up") / CLIENTS < 0.7

        deadline = time.monotonic() + 60
        while not async_engine.is_idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = async_engine.stats()
        assert async_engine.is_idle(), stats
        assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0
        after = httpx.post(url, json=GREEDY, timeout=60).json()["choices"][0]["message"]
        assert after == before
        assert httpx.get(f"{server.url}/health").status_code == 200
