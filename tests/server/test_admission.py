"""Admission of API requests: a fan-out limit, a full queue answered with 503, and a window
that keeps one huge request from holding every engine slot."""

from __future__ import annotations

import asyncio

import pytest

from pikaserve.config import ServerConfig
from pikaserve.engine.outputs import EngineStats, RequestOutput
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError
from pikaserve.server.app import ServerState
from pikaserve.server.asgi import HTTPError
from pikaserve.server.generation import Generation
from pikaserve.server.metrics import ServerMetrics


class FakeEngine:
    """Each request takes a few event-loop turns; counts how many are in at once."""

    def __init__(self, waiting: int = 0) -> None:
        self.active = self.most_active = 0
        self.waiting = waiting

    def stats(self) -> EngineStats:
        return EngineStats(0, self.waiting, 0.0, 0, 0, 0)

    async def generate(self, request_id, token_ids, params):
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            for step in range(3):
                await asyncio.sleep(0)
                yield RequestOutput(request_id, [7], "x", step == 2, "length" if step == 2
                                    else None, None, len(token_ids), 0, step + 1)
        finally:
            self.active -= 1


def state_for(engine: FakeEngine, **config) -> ServerState:
    state = ServerState(ServerConfig(**config), ["m"], ServerMetrics("m", lambda: None))
    state.engine = engine
    return state


def test_one_request_keeps_at_most_its_window_in_the_engine():
    engine = FakeEngine()
    work = [([1, 2], SamplingParams(max_tokens=3)) for _ in range(10)]
    gen = Generation(engine, "cmpl-1", work, ServerMetrics("m", lambda: None), 0.0,
                     max_inflight=2)
    choices = asyncio.run(gen.collect())
    assert engine.most_active == 2
    assert [c.finish_reason for c in choices] == ["length"] * 10
    assert all(c.num_tokens == 3 for c in choices)


def test_fan_out_past_the_limit_is_a_400():
    state = state_for(FakeEngine(), max_prompts_per_request=4)
    state.admit(4, "prompt")
    with pytest.raises(InvalidRequestError, match="at most 4 prompts") as exc:
        state.admit(5, "prompt")
    assert exc.value.param == "prompt"


def test_a_full_queue_is_a_503_only_when_limited():
    state_for(FakeEngine(waiting=100)).admit(1, "n")  # no limit by default
    full = state_for(FakeEngine(waiting=3), max_waiting_requests=3)
    with pytest.raises(HTTPError) as exc:
        full.admit(1, "n")
    assert exc.value.status == 503 and exc.value.code == "server_overloaded"
    state_for(FakeEngine(waiting=2), max_waiting_requests=3).admit(1, "n")
