"""Server test fixtures: one engine per session, real uvicorn servers on free ports.

Every module that needs a server starts its own app in a thread on 127.0.0.1 (port from the OS,
socket bound before uvicorn starts, so there is no race for it), all over the one session
engine: loading the model once keeps the suite lean on a small machine.
The model is the embedded default (SmolLM2-135M-Instruct GGUF) unless PIKASERVE_TEST_MODEL
names another. float32 so greedy outputs do not depend on batch composition.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from pikaserve.config import EngineConfig, ServerConfig
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.server.app import create_app
from pikaserve.server.connections import uvicorn_config

TEST_MODEL = os.environ.get("PIKASERVE_TEST_MODEL")  # None: the embedded default model
MAX_MODEL_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn running `app` on a thread; `url` is its base URL."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # proto IPPROTO_TCP, as uvicorn's own sockets have: asyncio then sets TCP_NODELAY
        # (with proto 0 it does not, and Nagle adds ~40 ms to every response).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # the server's own connection settings (limits, deadlines), from the app's config
        config = uvicorn_config(app, app.state.config, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def state(self):
        return self.app.state  # the Gate's ServerState

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def serve(engine: AsyncEngine, default_response_format: dict[str, Any] | None = None,
          **server_args: Any) -> Iterator[ServerThread]:
    app = create_app(ServerConfig(**server_args), engine=engine,
                     default_response_format=default_response_format)
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="session")
def async_engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine(EngineConfig(model=TEST_MODEL, dtype="float32",
                                      max_model_len=MAX_MODEL_LEN))
    yield engine
    engine.shutdown()


def metric_values(base_url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed 'name{labels}' and summed by bare name too."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
