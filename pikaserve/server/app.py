"""The HTTP app: OpenAI-compatible routes, SSE, error envelopes, API-key auth, lifecycle.

A plain Starlette app (FastAPI's base) with bodies parsed by our own strict pydantic models, so
every error takes OpenAI's envelope and no per-request dependency injection runs. The engine is
loaded in the background at start-up: until it is ready, and again while shutting down, routes
answer 503. Every generation watches for the client going away and aborts its engine requests
when it does, streamed or not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pikaserve import __version__
from pikaserve.config import DEFAULT_MODEL_ID, EngineConfig, ServerConfig
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.engine.client import EngineClient
from pikaserve.errors import InvalidRequestError
from pikaserve.heads.served import ServedHeads
from pikaserve.server import openai_format as fmt
from pikaserve.server import pooling_routes, routes
from pikaserve.server.asgi import ClientGone, HTTPError, SSEResponse, error_response
from pikaserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pikaserve.server.openapi import Endpoint, docs_page, openapi_spec
from pikaserve.server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pikaserve.server.prompts import PromptEncoder

logger = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_READY = {
    "starting": "the server is starting: the model is loading",
    "stopping": "the server is shutting down",
    "failed": "the model failed to load",
}
DRAIN_MARGIN = 1.0  # seconds before uvicorn's drain timeout at which requests are ended
# no API key needed (the spec and its page are as open as /health)
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping", "/openapi.json", "/docs"})
ALWAYS_PATHS = frozenset({"/metrics", "/openapi.json", "/docs"})  # answered while loading too


@dataclass
class ServerState:
    config: ServerConfig
    served_names: list[str]
    metrics: ServerMetrics
    default_response_format: dict[str, Any] | None = None
    heads: ServedHeads = field(default_factory=lambda: ServedHeads({}))
    phase: str = "starting"  # starting | ready | stopping | failed
    loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
    created: int = field(default_factory=lambda: int(time.time()))
    # Set by ready(); the gate answers 503 until then, so the routes read them through the
    # properties below, never unset.
    _engine: EngineClient | None = None
    _texts: fmt.TokenTexts | None = None
    _prompts: PromptEncoder | None = None

    @property
    def engine(self) -> EngineClient:
        return _loaded(self._engine)

    @engine.setter
    def engine(self, engine: EngineClient) -> None:
        self._engine = engine

    @property
    def texts(self) -> fmt.TokenTexts:
        return _loaded(self._texts)

    @property
    def prompts(self) -> PromptEncoder:
        return _loaded(self._prompts)

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def check_model(self, model: str | None, also: list[str] | None = None) -> None:
        """404 unless `model` is None, a served name, or one of `also` (e.g. head names)."""
        names = self.served_names + (also or [])
        if model is not None and model not in names:
            raise HTTPError(404, f"the model {model!r} does not exist; this server serves "
                            f"{', '.join(names)}", "model", "model_not_found")

    def admit(self, num_engine_requests: int, param: str) -> None:
        """Refuses an API request that fans out into too many engine requests, or that comes
        while the engine's queue is full (--max-waiting-requests)."""
        cfg = self.config
        if num_engine_requests > cfg.max_prompts_per_request:
            raise InvalidRequestError(f"one request may carry at most "
                                      f"{cfg.max_prompts_per_request} prompts (prompts x n)",
                                      param)
        if cfg.max_waiting_requests:
            waiting = self.engine.stats().num_waiting
            if waiting >= cfg.max_waiting_requests:
                raise HTTPError(503, f"the server is overloaded: {waiting} requests are "
                                "waiting; retry later", code="server_overloaded")

    def check_heads(self, engine: EngineClient) -> None:
        cfg = engine.model_config
        self.heads.check_model(engine.model_path, engine.tokenizer, cfg.hidden_size,
                               cfg.num_layers)

    def begin_shutdown(self) -> None:
        """On SIGTERM/SIGINT (any thread): new requests get 503 from now on, and requests
        still running just before --graceful-shutdown-timeout runs out are ended cleanly (a
        stream with an error event and [DONE], a plain request with 503) rather than cut."""
        if self.phase in ("starting", "ready"):
            self.phase = "stopping"
        if self.loop is not None and self._engine is not None:
            delay = max(0.0, self.config.graceful_shutdown_timeout - DRAIN_MARGIN)
            self.loop.call_soon_threadsafe(self.loop.call_later, delay, self._engine.end_all,
                                           "the server is shutting down, and the request did "
                                           "not finish within --graceful-shutdown-timeout")

    def ready(self, engine: EngineClient) -> None:
        self._engine = engine
        self._texts = fmt.TokenTexts(engine.tokenizer)
        self._prompts = PromptEncoder(engine.tokenizer, engine.max_model_len)
        self.phase = "ready"


def _loaded(value: T | None) -> T:
    """`value`, set once the engine is loaded (ServerState.ready)."""
    if value is None:
        raise RuntimeError("the engine is not loaded yet (the server is not ready)")
    return value


def api(handler: Callable[[Request, ServerState], Awaitable[Response | SSEResponse]]
        ) -> Callable[[Request], Awaitable[Response | SSEResponse]]:
    """Wraps a route: state lookup, and every failure as an OpenAI error envelope."""

    async def endpoint(request: Request) -> Response | SSEResponse:
        state: ServerState = request.app.state.pika
        try:
            return await handler(request, state)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.param, exc.code)
        except InvalidRequestError as exc:
            return error_response(400, str(exc), exc.param)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
    return endpoint


# --- gate: auth and lifecycle, before routing --------------------------------------------
class Gate:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self.expected = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            problem = None
            if self.expected is not None and path not in OPEN_PATHS:
                header = dict(scope["headers"]).get(b"authorization", b"")
                scheme, _, token = header.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(),
                                                                          self.expected):
                    problem = error_response(401, "invalid or missing API key "
                                             "(send 'Authorization: Bearer <key>')")
            if problem is None and self.state.phase != "ready" and path not in ALWAYS_PATHS:
                problem = error_response(503, _NOT_READY.get(self.state.phase, "not ready"))
            if problem is not None:
                await problem(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app ------------------------------------------------------------------------------
def served_names(config: ServerConfig, model: str | None) -> list[str]:
    return list(config.served_model_name or [model or DEFAULT_MODEL_ID])


def create_app(
    config: ServerConfig,
    engine: EngineClient | None = None,
    engine_config: EngineConfig | None = None,
    default_response_format: dict[str, Any] | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    heads: ServedHeads | None = None,
    start_engine: Callable[[], EngineClient] | None = None,
) -> Gate:
    """The ASGI app. Given `engine`, it serves it (and leaves shutting it down to the caller);
    otherwise it starts one in the background, by `start_engine` (the cluster's replicas) or
    from `engine_config`, and owns it. `heads` must have been trained on the model: checked
    when it is ready, failing the start otherwise."""
    model = engine.model if engine is not None else (
        engine_config.model if engine_config else None)
    names = served_names(config, model)
    holder: dict[str, EngineClient | None] = {"engine": engine}
    replicated = (engine.replicas_ready() is not None) if engine is not None else config.clustered
    metrics = ServerMetrics(
        names[0], lambda: holder["engine"].stats() if holder["engine"] is not None else None,
        config.metrics_prefix,
        (lambda: holder["engine"].replica_stats() if holder["engine"] is not None else {})
        if replicated else None)
    state = ServerState(config, names, metrics, default_response_format,
                        heads or ServedHeads({}))
    if engine is not None:
        state.check_heads(engine)
        state.ready(engine)

    async def load() -> None:
        loaded = None
        try:
            loaded = await asyncio.to_thread(
                start_engine or (lambda: AsyncEngine(engine_config or EngineConfig())))
            state.check_heads(loaded)
        except Exception as exc:  # noqa: BLE001  # model missing or broken: cannot serve
            if loaded is not None:
                loaded.shutdown()
            state.phase = "failed"
            logger.error("could not load the model: %s", exc)
            if on_load_failure is not None:
                on_load_failure(exc)
            return
        holder["engine"] = loaded
        if state.phase == "stopping":  # shut down while loading
            loaded.shutdown()
            return
        state.ready(loaded)
        logger.info("ready: serving %s as %s", loaded.model_path, ", ".join(names))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state.loop = asyncio.get_running_loop()
        loader = asyncio.create_task(load()) if engine is None else None
        yield
        state.phase = "stopping"
        if loader is not None:
            if not loader.done():
                # A load cannot be interrupted; its thread finishes and the process exits.
                loader.cancel()
            elif holder["engine"] is not None:
                await asyncio.to_thread(holder["engine"].shutdown)

    async def not_found(request: Request, exc: Exception) -> Response:
        http_exc = cast(HTTPException, exc)  # registered for 404 and 405 only
        return error_response(http_exc.status_code, str(http_exc.detail))  # path not echoed

    async def internal(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {exc}")

    spec = openapi_spec(ENDPOINTS, "pikaserve", __version__, config.api_key is not None)
    docs = docs_page(spec)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(spec)

    async def docs_html(request: Request) -> Response:
        return HTMLResponse(docs)

    app = Starlette(
        routes=[Route(e.path, e.handler if e.path in PLAIN_PATHS else api(e.handler),
                      methods=[e.method]) for e in ENDPOINTS] + [
            Route("/ping", health, methods=["POST"]),  # SageMaker's probe, GET in the table
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/docs", docs_html, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_found, Exception: internal},
        lifespan=lifespan,
    )
    app.state.pika = state
    return Gate(app, state)


async def health(request: Request) -> Response:
    """200 (the gate already answered 503 unless ready); with replicas, how many are ready,
    and 503 while none is."""
    state: ServerState = request.app.state.pika
    counts = state.engine.replicas_ready()
    if counts is None:
        return Response(status_code=200)
    ready, wanted = counts
    if not ready:
        return error_response(503, f"no replica is ready (0 of {wanted})")
    return JSONResponse({"replicas_ready": ready, "replicas": wanted})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def metrics_route(request: Request, state: ServerState) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


# Every route, what it parses and what it returns: the app routes with it and /openapi.json
# is generated from it.
ENDPOINTS = [
    Endpoint("/v1/chat/completions", "POST", routes.chat_completions, "Chat completion",
             ChatCompletionRequest, ChatCompletion, ChatCompletionChunk),
    Endpoint("/v1/completions", "POST", routes.completions, "Text completion",
             CompletionRequest, Completion, CompletionChunk),
    Endpoint("/v1/models", "GET", routes.models, "The served model names", None, ModelList),
    Endpoint("/classify", "POST", pooling_routes.classify, "Answer with a classification "
             "head (vLLM's shape)", ClassifyRequest, ClassifyResponse),
    Endpoint("/v1/classify", "POST", pooling_routes.classify, "Same as /classify",
             ClassifyRequest, ClassifyResponse),
    Endpoint("/v1/embeddings", "POST", pooling_routes.embeddings, "Embeddings (OpenAI's "
             "shape)", EmbeddingRequest, EmbeddingResponse),
    Endpoint("/tokenize", "POST", routes.tokenize, "Token ids of a prompt or a chat",
             TokenizeRequest, TokenizeResponse),
    Endpoint("/detokenize", "POST", routes.detokenize, "Text of token ids",
             DetokenizeRequest, DetokenizeResponse),
    Endpoint("/health", "GET", health, "200 when ready, 503 while loading or stopping; with "
             "replicas, a JSON body with how many are ready"),
    Endpoint("/ping", "GET", health, "Same as /health"),
    Endpoint("/version", "GET", version, "pikaserve's version"),
    Endpoint("/metrics", "GET", metrics_route, "Prometheus metrics",
             media_type=CONTENT_TYPE.split(";")[0]),
]
PLAIN_PATHS = frozenset({"/health", "/ping", "/version"})  # no ServerState argument
