"""ASGI plumbing under the routes: error envelopes, size-limited strict body parsing,
disconnect watching for plain and streamed responses.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from pikaserve.config import ServerConfig
from pikaserve.server import openai_format as fmt

T = TypeVar("T")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(fmt.error_body(status, message, param, code), status, headers=headers)


async def read_json(request: Request, model: type[BaseModel], config: ServerConfig) -> Any:
    """The body parsed into `model`; 413 past max_request_body_bytes, 408 when it has not all
    come within timeout_request_body seconds, 400 for bad JSON or fields."""
    limit = config.max_request_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"request body exceeds {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(config.timeout_request_body):
            async for chunk in request.stream():  # counted as it comes: chunked bodies too
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"request body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within "
                        f"{config.timeout_request_body:g} s") from None
    body = b"".join(chunks)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPError(400, *_describe(exc)) from None


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return f"malformed JSON body: {err['msg']}", None
    # Drop pydantic's union-member tags ("str", "list[int]") from the location.
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or "[" not in str(p)
           and p not in ("str", "int", "float", "bool", "function-after")]
    where = ".".join(loc)
    if err["type"] == "missing":
        return f"missing required field {where!r}", where or None
    field = loc[0] if loc else None
    if sum(1 for e in exc.errors() if e["loc"][:1] == err["loc"][:1]) > 1:
        # a union (prompt, stop, content...): no single member's complaint is the whole story
        return f"{field}: value is not of any accepted type ({err['msg']})", field
    return (f"{where}: {err['msg']}" if where else err["msg"]), field


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves (server stopping): stop the work too
        watcher.cancel()
        task.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


class SSEResponse:
    """Streams `body` as text/event-stream; stops it (closing the generator) on disconnect.

    Needed because uvicorn (ASGI spec 2.3) silently drops writes to a closed connection, so a
    stream that only writes would never notice its reader is gone.
    """

    def __init__(self, body: Any, on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.on_close = on_close
        self.headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *self.headers,
        ]})

        async def pump() -> None:
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self.on_close is not None:
                await self.on_close()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


