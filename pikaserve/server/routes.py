"""Route handlers: parse -> tokenize -> SamplingParams -> engine -> OpenAI JSON or SSE.

Limits the engine checks (prompt length, max_tokens, schema validity) surface when a
generation starts (Generation.start), before any response byte, so they are plain 400s.

Each handler runs on the event loop; the only waits are on its own requests' outputs, never on
an engine step as a whole (the engine runs on its own thread, see engine/async_engine.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError
from pikaserve.server import openai_format as fmt
from pikaserve.server.pooling_routes import chat_by_head, chat_head
from pikaserve.server.asgi import (
    ClientGone,
    HTTPError,
    SSEResponse,
    read_json,
    request_id,
    until_disconnect,
)
from pikaserve.server.generation import (
    Generation,
    chat_events,
    completion_events,
    error_status,
    sse_body,
)
from pikaserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pikaserve.server.sampling import chat_messages, sampling_params

if TYPE_CHECKING:
    from pikaserve.server.app import ServerState

logger = logging.getLogger("pikaserve.requests")


async def _run(request: Request, gen: Generation, stream: bool, sse_body,
               build) -> Response | SSEResponse:
    """Shared tail of both completion routes: start, then stream or collect."""
    handed_off = False
    try:
        await until_disconnect(request, gen.start())
        if stream:
            handed_off = True  # from here the SSE response owns the generation
            return SSEResponse(sse_body, gen.close)
        await until_disconnect(request, gen.collect())
        return JSONResponse(build())
    except (InvalidRequestError, ClientGone):
        raise
    except Exception as exc:
        raise HTTPError(*error_status(exc)) from exc
    finally:
        if not handed_off:
            await gen.close()


def _log(state: ServerState, rid: str, n_prompt: int, params: list[SamplingParams],
         stream: bool, user: str | None) -> None:
    if not state.config.disable_log_requests:
        p = params[0]
        logger.info("%s: prompt_tokens=%d n=%d max_tokens=%s temperature=%s stream=%s%s%s",
                    rid, n_prompt, len(params), p.max_tokens, p.temperature, stream,
                    " structured" if p.structured_outputs else "",
                    # repr: a newline (or any control character) in it cannot forge a log line
                    f" user={user!r}" if user else "")


async def chat_completions(request: Request, state: ServerState) -> Response | SSEResponse:
    arrival = time.perf_counter()
    req: ChatCompletionRequest = await read_json(
        request, ChatCompletionRequest, state.config)
    state.check_model(req.model)
    engine = state.engine
    params = sampling_params(req, state.default_response_format)
    messages = chat_messages(req.messages)
    state.admit(len(params), "n")
    head = chat_head(state, req, params)
    if head is not None:
        return await chat_by_head(request, state, req, head, messages, params, arrival)
    token_ids = await state.prompts.chat(messages, req.add_generation_prompt)
    rid = request_id("chatcmpl")
    _log(state, rid, len(token_ids), params, req.stream, req.user)
    gen = Generation(engine, rid, [(token_ids, p) for p in params], state.metrics, arrival,
                     state.config.max_inflight_per_request)
    created = int(time.time())
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    chunks = fmt.ChatChunks(rid, created, state.model_name, req.include_usage)
    return await _run(
        request, gen, req.stream, sse_body(chat_events(gen, chunks, state.texts, top_n)),
        lambda: fmt.chat_response(rid, created, state.model_name, gen.choices, state.texts,
                                  top_n),
    )


async def completions(request: Request, state: ServerState) -> Response | SSEResponse:
    arrival = time.perf_counter()
    req: CompletionRequest = await read_json(
        request, CompletionRequest, state.config)
    state.check_model(req.model)
    engine = state.engine
    params = sampling_params(req)
    prompts = await state.prompts.prompts(req.prompt, "prompt")
    state.admit(len(prompts) * req.n, "prompt")
    rid = request_id("cmpl")
    _log(state, rid, sum(map(len, prompts)), params, req.stream, req.user)
    # choice index = prompt index * n + choice, as OpenAI and vLLM number them
    work = [(ids, p) for ids in prompts for p in params]
    gen = Generation(engine, rid, work, state.metrics, arrival,
                     state.config.max_inflight_per_request)
    created = int(time.time())
    want_lp = req.logprobs is not None
    chunks = fmt.CompletionChunks(rid, created, state.model_name, req.include_usage)
    return await _run(
        request, gen, req.stream,
        sse_body(completion_events(gen, chunks, state.texts, want_lp, req.n)),
        lambda: fmt.completion_response(rid, created, state.model_name, gen.choices,
                                        state.texts, want_lp, req.n),
    )


async def models(request: Request, state: ServerState) -> Response:
    # root: the served name, not the model's path on disk (no client needs to know where
    # the operator keeps it)
    data: list[ModelCard] = [{
        "id": name, "object": "model", "created": state.created, "owned_by": "pikaserve",
        "root": state.model_name, "parent": None, "max_model_len": state.engine.max_model_len,
    } for name in state.served_names]
    body: ModelList = {"object": "list", "data": data}
    return JSONResponse(body)


async def tokenize(request: Request, state: ServerState) -> Response:
    req: TokenizeRequest = await read_json(
        request, TokenizeRequest, state.config)
    state.check_model(req.model)
    if req.messages is not None and req.prompt is None:
        ids = await state.prompts.chat(chat_messages(req.messages), req.add_generation_prompt,
                                       bool(req.add_special_tokens))
    elif req.prompt is not None and req.messages is None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = (await state.prompts.prompts(req.prompt, "prompt", add))[0]
    else:
        raise InvalidRequestError("give exactly one of prompt or messages", "prompt")
    body: TokenizeResponse = {
        "count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids,
        "token_strs": [state.texts(t) for t in ids] if req.return_token_strs else None,
    }
    return JSONResponse(body)


async def detokenize(request: Request, state: ServerState) -> Response:
    req: DetokenizeRequest = await read_json(
        request, DetokenizeRequest, state.config)
    state.check_model(req.model)
    vocab = state.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise InvalidRequestError(f"token ids must be in [0, {vocab})", "tokens")
    body: DetokenizeResponse = {"prompt": state.engine.tokenizer.decode(req.tokens)}
    return JSONResponse(body)
