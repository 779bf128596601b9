"""One server under test: started as its own process, waited for, stopped.

Every candidate config of `pikaserve tune` gets a fresh server (an empty prefix cache, nothing
left over from the last config) on a free port. Its output goes to a log file whose tail is the
error message when it fails to start or dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

LOG_TAIL_LINES = 15


class ServerFailed(RuntimeError):
    """The server did not start, or died; the message says how, with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (it could be taken before the server binds it: the
    server then fails to start, which is recorded like any failed start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`argv` run in its own process group (so stopping it stops its children too)."""

    def __init__(self, argv: list[str], url: str, log_path: Path) -> None:
        self.argv, self.url, self.log_path = argv, url, log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            try:
                self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise ServerFailed(f"cannot run {self.argv[0]!r}: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until GET /v1/models answered 200. Raises ServerFailed."""
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=5.0, trust_env=False) as client:
            while time.perf_counter() - started < timeout_s:
                self.check_alive("before it was ready")
                try:
                    if client.get("/v1/models").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.2)
        raise ServerFailed(f"not ready after {timeout_s:g} s{self.log_tail()}")

    def check_alive(self, when: str) -> None:
        if self._proc is not None and (code := self._proc.poll()) is not None:
            raise ServerFailed(f"exited with status {code} {when}{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the group, SIGKILL after `grace_s`."""
        if self._proc is None or self._proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self._proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return (f"; last lines of {self.log_path}:\n" + "\n".join(lines)) if lines else ""
