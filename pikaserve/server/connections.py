"""Connection limits under the routes: a cap on open connections and a deadline for each
request's head, so slow or idle clients cannot hold the server's file descriptors.

uvicorn (h11) closes a connection idle between requests after `timeout_keep_alive`, but a
client that connects and then sends nothing, or its headers a byte at a time, would hold the
connection forever, and enough of them exhaust the process's descriptors. This protocol arms a
timer whenever a request head is awaited and closes the connection when it fires; past
`max_connections` a new connection gets one `503` and is closed at once. Refusals are logged
at most once every LOG_EVERY seconds, with their count, so a flood cannot flood the log.
The body has its own deadline, in asgi.read_json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pikaserve.config import ServerConfig

logger = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds
_BODY = json.dumps({"error": {"message": "too many open connections; retry later",
                               "type": "ServiceUnavailable", "param": None,
                               "code": "too_many_connections"}}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (len(_BODY), _BODY))
_RESERVED_FDS = 128  # for the model files, logs and the engine


def default_max_connections() -> int:
    """What the process's descriptor limit allows, less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(soft - _RESERVED_FDS, 16384))


class _Refusals:
    """Counts refused connections and logs the count now and then."""

    def __init__(self) -> None:
        self.count, self.logged_at = 0, 0.0

    def add(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY:
            logger.warning("closed %d connection(s) in the last %.0f s: %s", self.count,
                           min(now - self.logged_at, LOG_EVERY), why)
            self.count, self.logged_at = 0, now


class GuardedH11Protocol(H11Protocol):
    max_connections = 1024
    head_timeout = 10.0
    refusals = _Refusals()
    _head_timer: asyncio.TimerHandle | None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(REFUSAL)
            transport.close()
            self.refusals.add(f"more than {self.max_connections} open connections")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        """Runs the head deadline while a request head is awaited, stops it once one came."""
        if not self._awaiting_head() or self.transport.is_closing():
            self._disarm()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()
            self.refusals.add(f"no complete request head within {self.head_timeout:g} s")


def uvicorn_config(app: Any, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for `app` under `config` (the server and the tests use this)."""
    protocol = type("Protocol", (GuardedH11Protocol,), {
        "max_connections": config.max_connections or default_max_connections(),
        "head_timeout": config.timeout_request_head,
    })
    settings: dict[str, Any] = dict(
        host=config.host, port=config.port, http=protocol, lifespan="on",
        log_level=config.uvicorn_log_level, access_log=not config.disable_log_requests,
        timeout_graceful_shutdown=config.graceful_shutdown_timeout,
        timeout_keep_alive=config.timeout_keep_alive,
    )
    return uvicorn.Config(app, **(settings | overrides))
