"""Slow and idle clients: a request head that never completes closes its connection, a body
that never completes gets 408, connections past the cap get 503, and the server keeps
answering everyone else."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from .conftest import serve


@pytest.fixture(scope="module")
def server(async_engine):
    with serve(async_engine, timeout_request_head=0.5, timeout_request_body=0.5,
               max_connections=4) as s:
        yield s


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def read_all(sock: socket.socket, until: bytes | None = None) -> bytes:
    """Everything until the server closes (or until `until` has come)."""
    data = b""
    while (until is None or until not in data) and (chunk := sock.recv(65536)):
        data += chunk
    return data


def test_an_incomplete_head_is_closed_after_its_deadline(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    started = time.monotonic()
    assert read_all(sock) == b""  # closed by the server, nothing sent
    assert time.monotonic() - started < 4
    sock.close()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_silent_connection_is_closed_too(server):
    sock = connect(server)
    assert read_all(sock) == b""
    sock.close()


def test_an_incomplete_body_gets_408(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
    reply = read_all(sock, until=b"}}").decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply


def test_connections_past_the_cap_get_503(server):
    idle = [connect(server) for _ in range(4)]
    try:
        time.sleep(0.1)
        extra = connect(server)
        reply = read_all(extra).decode()
        extra.close()
        assert reply.startswith("HTTP/1.1 503") and "too_many_connections" in reply
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{server.url}/health").status_code == 200
