"""Fixtures of the bench tests: fake OpenAI servers on free ports."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from typing import Any, Callable, Iterator

import pytest

from .fake_openai import FakeOpenAIServer, Plan

# How late the client may see an event, on a shared, busy 2-core machine. Never early: an event
# cannot be seen before the fake server sends it, so lower bounds are exact. The timing tests use
# delays (80 ms and more) that keep wrong math outside these bounds.
JITTER = 0.06


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Factory: fake_server(planner=..., model=..., tokenize=...) -> a started server, stopped after the test."""
    with ExitStack() as stack:

        def start(planner: Callable[[dict[str, Any]], Plan] = lambda body: Plan(), **kw: Any) -> FakeOpenAIServer:
            return stack.enter_context(FakeOpenAIServer(planner, **kw))

        yield start


@pytest.fixture
def closed_port_url() -> str:
    """A URL nothing listens on (the OS picked the port, then it was closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
