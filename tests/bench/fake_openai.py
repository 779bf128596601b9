"""A small fake OpenAI streaming server for the bench tests.

Raw HTTP/1.1 on asyncio in a background thread, on 127.0.0.1 at a port the OS picks. What each
request gets (status, delays before every chunk, text, usage, aborts) is decided by a `planner`
function of the request body, so tests control timing exactly. Every request is logged with
perf_counter times (same clock as the load generator: both run in the test process).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Plan:
    """How the fake server answers one completion request."""

    status: int = 200
    role_delay: float = 0.0  # seconds before the role chunk (chat only; content "")
    chunks: list[tuple[float, str]] = field(default_factory=lambda: [(0.0, "ok")])  # (delay before, text)
    usage_tokens: int | None = None  # completion_tokens to report; None: no usage chunk
    prompt_tokens: int = 7
    finish_reason: str | None = "stop"
    send_done: bool = True  # end with data: [DONE]
    abort_after: int | None = None  # cut the connection after this many content chunks
    error_event: bool = False  # send data: {"error": ...} instead of chunks


@dataclass
class LoggedRequest:
    path: str
    body: dict[str, Any]
    received: float  # perf_counter when the body was read
    finished: float = 0.0  # perf_counter when the last bytes started out (clients react after)


Planner = Callable[[dict[str, Any]], Plan]


def user_text(body: dict[str, Any]) -> str:
    """The prompt of a request: last message content (chat) or prompt (completions)."""
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body.get("prompt", ""))


class FakeOpenAIServer:
    def __init__(
        self, planner: Planner, model: str = "fake-model", tokenize: Callable[[str], int] | None = None,
        port: int = 0, slots: int | None = None,
    ) -> None:
        """port 0: the OS picks one. slots: completions answered at once (the rest queue)."""
        self.planner, self.model, self.tokenize, self.port = planner, model, tokenize, port
        self._slots = asyncio.Semaphore(slots) if slots is not None else None
        self.log: list[LoggedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def completions(self) -> list[LoggedRequest]:
        return [r for r in self.log if r.path.startswith("/v1/") and r.path != "/v1/models"]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: several requests per connection
                request_line = await reader.readline()
                if not request_line:
                    break
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                if not await self._respond(method, path, body, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        if method == "GET" and path == "/v1/models":
            return await self._send_json(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        if path == "/tokenize":
            if self.tokenize is None:
                return await self._send_json(writer, 404, {"detail": "Not Found"})
            count = self.tokenize(body["prompt"])
            return await self._send_json(writer, 200, {"tokens": list(range(count)), "count": count, "max_model_len": 2048})
        entry = LoggedRequest(path, body, time.perf_counter())
        self.log.append(entry)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            plan = self.planner(body)
            if plan.status != 200:
                return await self._send_json(writer, plan.status, {"error": {"message": "planned failure", "code": plan.status}})
            if self._slots is None:
                return await self._stream(writer, plan, entry, chat=path == "/v1/chat/completions")
            async with self._slots:
                return await self._stream(writer, plan, entry, chat=path == "/v1/chat/completions")
        finally:
            self.in_flight -= 1
            entry.finished = entry.finished or time.perf_counter()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> bool:
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    async def _stream(self, writer: asyncio.StreamWriter, plan: Plan, entry: LoggedRequest, chat: bool) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()

        async def event(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            frame = f"data: {data}\n\n".encode()
            writer.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            await writer.drain()

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if plan.error_event:
            await event({"error": {"message": "planned stream error"}})
        else:
            if chat:
                await asyncio.sleep(plan.role_delay)
                await event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for sent, (delay, text) in enumerate(plan.chunks):
                if plan.abort_after is not None and sent == plan.abort_after:
                    writer.transport.abort()  # mid-stream: the chunked body never completes
                    return False
                await asyncio.sleep(delay)
                await event({"object": "chat.completion.chunk", "choices": [choice(text)]})
            if plan.finish_reason is not None:
                await event({"choices": [choice("", plan.finish_reason)]})
            if plan.usage_tokens is not None:
                usage = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.usage_tokens,
                         "total_tokens": plan.prompt_tokens + plan.usage_tokens}  # fmt: skip
                await event({"choices": [], "usage": usage})
        # A client may stop reading at [DONE] and send its next request before this handler
        # resumes, so the response counts as finished when its last bytes start out.
        entry.finished = time.perf_counter()
        if plan.send_done:
            await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
