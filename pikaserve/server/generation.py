"""One API request's engine work: n choices (times prompts) fanned out as engine requests,
merged back into one stream of (choice index, RequestOutput), with metrics recorded as outputs
arrive, and turned into OpenAI SSE chunks.

Closing the stream (client gone, server stopping) closes every engine generator, and that aborts
its request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from pikaserve.engine.async_engine import EngineDeadError
from pikaserve.engine.client import EngineClient
from pikaserve.engine.outputs import RequestOutput
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError
from pikaserve.server import openai_format as fmt
from pikaserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

Item = tuple[int, RequestOutput]
_END = object()


class Generation:
    """The engine requests behind one API request; iterate `stream()` once."""

    def __init__(
        self,
        engine: EngineClient,
        request_id: str,
        work: Sequence[tuple[list[int], SamplingParams]],
        metrics: ServerMetrics,
        arrival: float,
        max_inflight: int,
    ) -> None:
        self.engine = engine
        # at most this many of its engine requests in the engine at once (ServerConfig)
        self.window = asyncio.Semaphore(max_inflight)
        self.request_id = request_id
        self.work = work
        self.metrics = metrics
        self.arrival = arrival
        self.choices = [fmt.Choice(i) for i in range(len(work))]
        self._last = [0.0] * len(work)
        self._gens: list[AsyncGenerator[RequestOutput, None]] = []
        self._tasks: list[asyncio.Task] = []
        self._it = self._outputs()
        self._first: Item | None = None

    async def start(self) -> None:
        """Waits for the first output, so errors the engine finds on admission (an invalid
        schema, say) become an HTTP error before any response byte is sent."""
        self._first = await anext(self._it)

    async def stream(self) -> AsyncIterator[Item]:
        try:
            if self._first is not None:
                yield self._first
            async for item in self._it:
                yield item
        finally:
            await self.close()

    async def collect(self) -> list[fmt.Choice]:
        async for _ in self.stream():
            pass
        return self.choices

    async def close(self) -> None:
        """Aborts whatever is unfinished in the engine (idempotent)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for gen in self._gens:
            await gen.aclose()  # a generator closed before its last output aborts its request
        await self._it.aclose()

    # --- merging -------------------------------------------------------------------------
    def _engine_id(self, i: int) -> str:
        return self.request_id if len(self.work) == 1 else f"{self.request_id}-{i}"

    async def _outputs(self) -> AsyncGenerator[Item, None]:
        gens = [
            self.engine.generate(self._engine_id(i), ids, params)
            for i, (ids, params) in enumerate(self.work)
        ]
        self._gens = gens
        if len(gens) == 1:  # the common case: no tasks, no extra queue hop
            async for out in gens[0]:
                self._record(0, out)
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                async with self.window:  # the engine request is added on the first anext
                    async for out in gen:
                        queue.put_nowait((i, out))
                queue.put_nowait((i, _END))
            except Exception as exc:  # noqa: BLE001  # re-raised by the consumer below
                queue.put_nowait((i, exc))

        self._tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            self._record(i, item)
            yield i, item

    def _record(self, i: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        c = self.choices[i]
        m = self.metrics
        if out.new_token_ids:
            if c.num_tokens == 0:
                m.ttft.observe(now - self.arrival)
                m.prompt_tokens.inc(out.num_prompt_tokens)
            else:
                m.itl.observe(now - self._last[i])
            self._last[i] = now
            m.generation_tokens.inc(len(out.new_token_ids))
        c.num_tokens = out.num_output_tokens
        c.num_prompt_tokens = out.num_prompt_tokens
        c.num_cached_tokens = out.num_cached_tokens
        if out.new_text:
            c.text.append(out.new_text)
        if out.logprobs:
            c.logprobs.extend(out.logprobs)
        if out.finished:
            c.finish_reason = out.finish_reason
            m.e2e.observe(now - self.arrival)
            if out.scheduled_time is not None:
                m.queue.observe(max(0.0, out.scheduled_time - out.arrival_time))
            if out.finish_reason in ("stop", "length"):
                m.success(out.finish_reason)


def error_status(exc: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, message, param) for an exception raised while generating."""
    if isinstance(exc, InvalidRequestError):
        return 400, str(exc), exc.param
    if isinstance(exc, EngineDeadError):
        logger.warning("request ended: %s", exc)  # one line per request, no traceback
        return 503, str(exc), None
    logger.error("request failed: %r", exc)
    return 500, f"internal error: {exc}", None


async def sse_body(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream's events, then `data: [DONE]`; an error once the headers are out is reported
    in-band as an error event before it, as vLLM does."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001  # the status line is sent: say it in the body
        status, message, param = error_status(exc)
        yield fmt.sse(fmt.error_body(status, message, param))
    yield fmt.DONE


async def chat_events(
    gen: Generation, chunks: fmt.ChatChunks, texts: fmt.TokenTexts, top_n: int | None
) -> AsyncIterator[bytes]:
    """A chat completion's chunks: roles, content deltas, finish chunks, usage."""
    for c in gen.choices:
        yield chunks.role(c.index)
    async for i, out in gen.stream():
        if out.new_text or (out.logprobs and top_n is not None):
            lp = fmt.chat_logprobs(out.logprobs, texts, top_n) if top_n is not None else None
            yield chunks.content(i, out.new_text, lp)
        if out.finished:
            yield chunks.finish(i, out.finish_reason)
    if chunks.include_usage:
        yield chunks.usage(fmt.usage_of(gen.choices, len(gen.choices)))


async def completion_events(
    gen: Generation, chunks: fmt.CompletionChunks, texts: fmt.TokenTexts,
    want_logprobs: bool, n: int,
) -> AsyncIterator[bytes]:
    """A completion's chunks: text deltas (with finish reasons), usage."""
    offsets = [0] * len(gen.choices)
    async for i, out in gen.stream():
        lp = None
        if want_logprobs:
            lp = fmt.completion_logprobs(out.logprobs, texts, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        if out.new_text or lp or out.finished:
            reason = out.finish_reason if out.finished else None
            yield chunks.text(i, out.new_text, lp, reason)
    if chunks.include_usage:
        yield chunks.usage(fmt.usage_of(gen.choices, n))
