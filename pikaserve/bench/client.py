"""The HTTP side of `pikaserve bench`: one streamed request -> `RequestRecord`, plus the set-up calls
(GET /v1/models for the default model, POST /tokenize for exact prompt lengths).

Error kinds, each counted separately:
- `connect`: no connection (refused, unreachable, connect timeout)
- `timeout`: no data for --timeout seconds
- `http_<status>`: the server answered with an error status (e.g. `http_500`)
- `aborted`: the response broke off: the connection closed or reset mid-stream, or the stream
  ended without `[DONE]` and without a finish_reason
- `stream_error`: the stream carried an error object or data that is not JSON
- `other`: anything else (the record's error_detail says what)
"""

from __future__ import annotations

import json
import time
from types import TracebackType
from typing import Any, Callable

import httpx

from pikaserve.bench.records import RequestRecord
from pikaserve.bench.validity import is_valid_answer

Checker = Callable[[Any], bool]


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _content(choice: dict[str, Any]) -> str:
    """Text of one streamed choice: chat `delta.content` or completions `text`."""
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    *,
    index: int,
    server: int,
    scheduled: float | None = None,
    checker: Checker | None = None,
) -> RequestRecord:
    """Send one streaming request and time every content chunk (see records.py for the metrics)."""
    record = RequestRecord(index=index, server=server, start=time.perf_counter(), scheduled=scheduled)
    parts: list[str] = []
    finished = False
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                record.error, record.error_detail = f"http_{response.status_code}", response.text[:300]
            else:
                async for line in response.aiter_lines():
                    now = time.perf_counter()  # before parsing: parsing is our cost, not the server's
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        record.error, record.error_detail = "stream_error", data[:300]
                        break
                    if not isinstance(chunk, dict) or "error" in chunk:
                        record.error, record.error_detail = "stream_error", data[:300]
                        break
                    for choice in chunk.get("choices") or ():
                        if text := _content(choice):
                            record.chunk_times.append(now - record.start)
                            parts.append(text)
                        if choice.get("finish_reason"):
                            record.finish_reason = choice["finish_reason"]
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        if isinstance(usage.get("completion_tokens"), int):
                            record.output_tokens, record.tokens_from_usage = usage["completion_tokens"], True
                        if isinstance(usage.get("prompt_tokens"), int):
                            record.prompt_tokens = usage["prompt_tokens"]
                if record.error is None and not finished and record.finish_reason is None:
                    record.error, record.error_detail = "aborted", "stream ended without [DONE] or finish_reason"
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        record.error, record.error_detail = "connect", repr(exc)
    except httpx.TimeoutException as exc:
        record.error, record.error_detail = "timeout", repr(exc)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        record.error, record.error_detail = "aborted", repr(exc)
    except httpx.HTTPError as exc:
        record.error, record.error_detail = "other", repr(exc)
    record.end = time.perf_counter()
    record.text = "".join(parts)
    if not record.tokens_from_usage:
        record.output_tokens = len(record.chunk_times)
    if record.ok and checker is not None:
        record.valid = is_valid_answer(record.text, checker)
    return record


def first_model(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model id of GET /v1/models."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=auth_headers(api_key), timeout=timeout_s, trust_env=False)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot get a model id from {url}/v1/models ({exc!r}); pass --model") from None


class ServerTokenizer:
    """Counts prompt tokens with the server's vLLM-shaped POST /tokenize, when it has one."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self._client = httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout_s, trust_env=False)
        self._model = model
        try:
            self.count("hello world")
            self.available = True
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.available = False

    def count(self, text: str) -> int:
        response = self._client.post("/tokenize", json={"model": self._model, "prompt": text})
        response.raise_for_status()
        data = response.json()
        return int(data["count"]) if "count" in data else len(data["tokens"])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServerTokenizer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
