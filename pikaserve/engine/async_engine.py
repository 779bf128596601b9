"""Runs the engine loop on its own thread and streams outputs to asyncio callers.

The loop thread owns the LLMEngine: requests and aborts reach it through a thread-safe inbox,
and each step's outputs go back to the event loop in one call. So the loop never waits on HTTP
work, and HTTP handlers never wait on a whole step (only on their own queue).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from pikaserve.config import EngineConfig
from pikaserve.engine.llm_engine import LLMEngine
from pikaserve.engine.constraint import Constraint
from pikaserve.engine.outputs import EngineStats, RequestOutput
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can run."""


@dataclass(slots=True)
class _Add:
    request_id: str
    token_ids: list[int]
    params: SamplingParams | PoolingParams
    constraint: Constraint | None
    stream: "_Stream"


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched only by the loop thread
        self._stopping = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._engine = engine  # set on the loop thread when not given
        self._thread = threading.Thread(
            target=self._main, args=(config or EngineConfig(),), name="pikaserve-engine",
            daemon=True,
        )
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        # what callers may know of the model; the LLMEngine itself stays the loop's
        self.model = self.engine.config.model  # as configured (None: the embedded default)
        self.tokenizer = self.engine.tokenizer
        self.model_path = self.engine.model_path
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        from pikaserve.structured import warm_up

        warm_up(self.tokenizer)  # index the vocabulary for grammars now, on a worker thread

    @property
    def engine(self) -> LLMEngine:
        """The LLMEngine, owned by the loop thread (loaded before the constructor returns)."""
        if self._engine is None:
            raise RuntimeError("the engine is not loaded yet")
        return self._engine

    # --- caller side (any thread / event loop) ------------------------------------------
    async def generate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        params: SamplingParams | PoolingParams,
        constraint: Constraint | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields one RequestOutput per engine step that produced something (a pooling
        request: just its finished one); aborts the request if the caller stops iterating
        early (e.g. the client disconnected)."""
        if self._stopping.is_set():
            raise EngineDeadError("the engine is shutting down")
        token_ids = list(token_ids)
        self.engine.check_request(token_ids, params)  # raises InvalidRequestError here
        if (constraint is None and isinstance(params, SamplingParams)
                and params.structured_outputs is not None):
            # A new grammar is compiled on a grammar thread: a bad schema raises
            # InvalidRequestError here, and the engine loop never compiles.
            from pikaserve.structured import constraint_off_loop

            constraint = await constraint_off_loop(params.structured_outputs, self.tokenizer)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(_Add(request_id, token_ids, params, constraint, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def replica_stats(self) -> dict[str, EngineStats]:
        return {}  # one engine, no replicas

    def replicas_ready(self) -> tuple[int, int] | None:
        return None

    def is_idle(self) -> bool:
        """Nothing running or waiting, and no KV block held by a request."""
        return self.engine.pool_is_idle() and not self.engine.has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def end_all(self, reason: str) -> None:
        """Aborts every request in the engine; each caller's generate() raises
        EngineDeadError(reason). The engine itself keeps running."""
        self._inbox.put(("end_all", reason))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    # --- loop thread --------------------------------------------------------------------
    def _main(self, config: EngineConfig) -> None:
        # The model is loaded on the thread that steps it. On CPU, torch ops run several times
        # slower on a thread other than the one whose OpenMP team did the earlier work
        # (measured: small ops 25 us -> 190 us, a decode step ~1.6x), so one thread does all.
        if self._engine is None:
            try:
                self._engine = LLMEngine(config)
            except BaseException as exc:  # noqa: BLE001  # re-raised in the constructor
                self._load_error = exc
        self._loaded.set()
        if self._load_error is None:
            self._run()

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            # Block only when there is nothing to compute.
            self._drain(block=not engine.has_unfinished_requests())
            if self._stopping.is_set() or not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug must not kill the server: fail what was running
                logger.exception("engine step failed; aborting in-flight requests")
                self._fail_all(exc)
                continue
            self._deliver(outputs)
        self._fail_all(EngineDeadError("the engine shut down"))

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if isinstance(item, _Add):
            if item.request_id in self._streams:
                self._send(item.stream, InvalidRequestError(
                    f"request id {item.request_id!r} is already in use"))
                return
            try:
                self.engine.add_request(item.request_id, item.token_ids, item.params, item.constraint)
            except Exception as exc:  # noqa: BLE001  # the caller's error, raised in generate()
                self._send(item.stream, exc)
                return
            self._streams[item.request_id] = item.stream
        elif item[0] == "end_all":
            self._fail_all(EngineDeadError(item[1]))
        elif item[0] == "abort":
            stream = self._streams.pop(item[1], None)
            out = self.engine.abort_request(item[1])
            if stream is not None and out is not None:
                self._send(stream, out)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)  # one wake-up per step, not per request

    def _send(self, stream: _Stream, item) -> None:
        _call_soon(stream.loop, stream.queue.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            self._send(stream, exc if isinstance(exc, EngineDeadError) else RuntimeError(
                f"internal engine error: {exc}"))
        self._streams.clear()


def _put_all(items) -> None:
    for q, out in items:
        q.put_nowait(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's event loop is closed; nobody is listening any more
        pass
