"""Answers from one prefill pass instead of generation: classification heads (/classify and
chat requests whose JSON schema a head answers) and embeddings (/v1/embeddings).

Each input is one pooling request in the engine's continuous batch (engine/pooling_params.py):
its uncached prompt tokens are computed with whatever else is running, and the head or the
embedding is applied on the engine thread to the hidden states of its span.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pikaserve.engine.outputs import RequestOutput
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.errors import InvalidRequestError
from pikaserve.heads.head import ClassificationHead, HeadAnswer
from pikaserve.heads.schema import render_answer
from pikaserve.heads.served import embed
from pikaserve.server import openai_format as fmt
from pikaserve.server.asgi import (
    ClientGone,
    HTTPError,
    SSEResponse,
    read_json,
    request_id,
    until_disconnect,
)
from pikaserve.server.generation import error_status, sse_body
from pikaserve.server.protocol import (
    ChatCompletionRequest,
    ClassifyItem,
    ClassifyRequest,
    ClassifyResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    FieldAnswer,
    Usage,
)
from pikaserve.server.sampling import chat_messages

if TYPE_CHECKING:
    from pikaserve.server.app import ServerState

logger = logging.getLogger("pikaserve.requests")  # the per-request log of routes.py
HEAD_HEADER = "x-pikaserve-head"


async def pool(request: Request, state: ServerState, rid: str,
               work: list[tuple[list[int], PoolingParams]]) -> list[RequestOutput]:
    """Runs one pooling request per prompt, all at once; aborts them all if the client goes."""
    engine = state.engine
    window = asyncio.Semaphore(state.config.max_inflight_per_request)

    async def one(i: int, ids: list[int], params: PoolingParams) -> RequestOutput:
        gen = engine.generate(rid if len(work) == 1 else f"{rid}-{i}", ids, params)
        try:
            async with window:
                async for out in gen:
                    last = out
            return last
        finally:
            await gen.aclose()  # closing before the end aborts the engine request

    tasks = [asyncio.ensure_future(one(i, ids, params)) for i, (ids, params) in enumerate(work)]
    try:
        return await until_disconnect(request, asyncio.gather(*tasks))
    except (InvalidRequestError, ClientGone):
        raise
    except Exception as exc:
        raise HTTPError(*error_status(exc)) from exc
    finally:  # one input failed or the client left: abort the others too
        for task in tasks:
            task.cancel()


# --- /classify -------------------------------------------------------------------------------
def _head_for(state: ServerState, model: str | None) -> tuple[str, ClassificationHead]:
    heads = state.heads
    if not heads:
        raise HTTPError(400, "this server has no classification head; start it with "
                        "--head NAME=DIR (or --head pika)", "model")
    state.check_model(model, heads.names)
    name = model if model in heads.names else heads.names[0]
    return name, heads[name]


async def classify(request: Request, state: ServerState) -> Response:
    arrival = time.perf_counter()
    req: ClassifyRequest = await read_json(request, ClassifyRequest,
                                           state.config)
    name, head = _head_for(state, req.model)
    if (req.input is None) == (req.messages is None):
        raise InvalidRequestError("give exactly one of input or messages", "input")
    if req.messages is not None:
        chats = [chat_messages(req.messages)]
    else:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise InvalidRequestError("input must hold at least one text", "input")
        system = [{"role": "system", "content": head.info.system_prompt}] \
            if head.info.system_prompt else []
        chats = [system + [{"role": "user", "content": t}] for t in texts]
    state.admit(len(chats), "input")
    rid = request_id("classify")
    outs = await pool(request, state, rid, [await _head_work(state, head, c) for c in chats])
    seconds = time.perf_counter() - arrival
    data: list[ClassifyItem] = []
    for i, out in enumerate(outs):
        state.metrics.head_answer(name, seconds, out.num_prompt_tokens)
        fields: dict[str, FieldAnswer] = {}
        for f, probs in zip(head.fields, out.pooled.probs()):
            best = max(range(len(probs)), key=probs.__getitem__)
            fields[f.name] = {"label": f.labels[best], "probs": probs,
                              "num_classes": len(probs)}
        first = fields[head.fields[0].name]
        data.append({"index": i, **first, "fields": fields})
    body: ClassifyResponse = {"id": rid, "object": "list", "created": int(time.time()),
                              "model": name, "data": data, "usage": _usage(outs)}
    return JSONResponse(body, headers={HEAD_HEADER: name})


async def _head_work(state: ServerState, head: ClassificationHead, messages: list[dict],
                     cache_salt: str | None = None) -> tuple[list[int], PoolingParams]:
    ids, start, split = await state.prompts.head_prompt(head, messages)
    return ids, PoolingParams(head.layers, head, start, split, cache_salt)


def _usage(outs: list[RequestOutput]) -> Usage:
    n_prompt = sum(o.num_prompt_tokens for o in outs)
    return {"prompt_tokens": n_prompt, "total_tokens": n_prompt, "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


# --- chat completions answered by a head -----------------------------------------------------
def chat_head(state: ServerState, req: ChatCompletionRequest,
              params: list[SamplingParams]) -> str | None:
    """The head that answers this chat request: its JSON schema is a head's schema, and it
    asks for nothing a head cannot give (token logprobs, a prompt without the assistant turn
    the head was trained on)."""
    so = params[0].structured_outputs
    if (not state.heads or so is None or so.json is None or req.logprobs
            or not req.add_generation_prompt):
        return None
    return state.heads.for_schema(so.json)


def pick_labels(answer: HeadAnswer, params: SamplingParams) -> list[int]:
    """Argmax at temperature 0; otherwise a sample from softmax(logits / T), seeded."""
    if params.greedy:
        return [int(x.argmax()) for x in answer.logits]
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return [int(torch.multinomial(torch.softmax(x / params.temperature, 0), 1, generator=gen))
            for x in answer.logits]


async def chat_by_head(request: Request, state: ServerState, req: ChatCompletionRequest,
                       name: str, messages: list[dict], params: list[SamplingParams],
                       arrival: float) -> Response | SSEResponse:
    """A chat completion whose message is the head's answer, as compact JSON in schema order,
    from one pass over the prompt's uncached tokens. Each of the n choices draws its own labels
    from the same probabilities."""
    head = state.heads[name]  # chat_head's answer: a served head's name
    rid = request_id("chatcmpl")
    out = (await pool(request, state, rid, [await _head_work(state, head, messages,
                                                            params[0].cache_salt)]))[0]
    state.metrics.head_answer(name, time.perf_counter() - arrival, out.num_prompt_tokens)
    if not state.config.disable_log_requests:
        logger.info("%s: prompt_tokens=%d n=%d answered by head %s stream=%s", rid,
                    out.num_prompt_tokens, len(params), name, req.stream)
    choices = [_head_choice(i, render_answer(head.fields, pick_labels(out.pooled, p)), p, out,
                            state.engine.tokenizer) for i, p in enumerate(params)]
    created = int(time.time())
    headers = {HEAD_HEADER: name}
    if not req.stream:
        return JSONResponse(fmt.chat_response(rid, created, state.model_name, choices,
                                              state.texts, None), headers=headers)
    chunks = fmt.ChatChunks(rid, created, state.model_name, req.include_usage)

    async def events():
        for c in choices:
            yield chunks.role(c.index)
            yield chunks.content(c.index, "".join(c.text), None)
            yield chunks.finish(c.index, c.finish_reason)
        if req.include_usage:
            yield chunks.usage(fmt.usage_of(choices, len(choices)))

    # the engine request is already done
    return SSEResponse(sse_body(events()), headers=headers)


def _head_choice(index: int, text: str, params: SamplingParams, out: RequestOutput,
                 tokenizer) -> fmt.Choice:
    """The answer as a choice; max_tokens and stop strings cut it as they would cut the same
    text generated token by token."""
    reason = "stop"
    for s in params.stop:
        cut = text.find(s)
        if cut >= 0:
            text = text[: cut + len(s) if params.include_stop_str_in_output else cut]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if params.max_tokens is not None and len(ids) > params.max_tokens:
        ids, reason = ids[: params.max_tokens], "length"
        text = tokenizer.decode(ids)
    return fmt.Choice(index, [text], len(ids), reason, [], out.num_prompt_tokens,
                      out.num_cached_tokens)


# --- /v1/embeddings --------------------------------------------------------------------------
async def embeddings(request: Request, state: ServerState) -> Response:
    req: EmbeddingRequest = await read_json(request, EmbeddingRequest,
                                            state.config)
    state.check_model(req.model)
    prompts = await state.prompts.prompts(req.input, "input")
    state.admit(len(prompts), "input")
    layers = state.heads.embedding_layers(state.engine.model_config.num_layers)
    dim = len(layers) * state.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions != dim:
        raise InvalidRequestError(f"dimensions must be {dim} for this model (or left out)",
                                  "dimensions")
    rid = request_id("embd")
    outs = await pool(request, state, rid, [(p, PoolingParams(layers, embed, 0)) for p in prompts])
    data: list[Embedding] = [{"object": "embedding", "index": i,
                              "embedding": _encode(o.pooled, req.encoding_format)}
                             for i, o in enumerate(outs)]
    n_prompt = sum(o.num_prompt_tokens for o in outs)
    body: EmbeddingResponse = {"object": "list", "data": data, "model": state.model_name,
                               "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt}}
    return JSONResponse(body)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()
